"""The training loop shared by every stage: one process or many (``torchrun``, DDP over gloo on CPU, NCCL on GPUs).

A *task* (see ``trainer/tasks.py`` and ``trainer/unimodal.py``) supplies the model, the batches, an
evaluation and how to save the result; this file owns everything else:

* AdamW (no weight decay on biases, norms and 1-d parameters), linear warmup then cosine decay;
* ``--device auto|cpu|cuda|cuda:N`` (``trainer/device.py``): model, frozen parts and every batch on it;
* one autocast context (bf16 where the CPU or GPU supports it), gradient accumulation, clipping;
* a deterministic data order and per-step seeds (the global CPU and CUDA generators are reseeded from
  the step and rank at each step), so a run resumed from a checkpoint continues the very same curve and
  N processes see the same global batch as one;
* checkpoints (model, optimizer, scheduler, step, config) written from CPU tensors to a temporary file and renamed,
  ``--resume latest`` to continue after a kill; rank-0 logging with a progress bar and periodic eval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory
from trainer.device import (
    PRECISIONS,
    autocast_context,
    check_device_choice,
    describe,
    move_to,
    resolve_device,
    resolve_precision,
    to_cpu,
)

CKPT_DIR = "checkpoints"
LATEST = "latest.pt"


@dataclass
class LoopConfig:
    out: str
    steps: int = 1000
    batch_size: int = 64  # global micro-batch: split over the ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.05
    beta2: float = 0.98
    clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast where the CPU/GPU has it)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: cuda when available; torchrun: cuda:LOCAL_RANK)
    eval_every: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    resume: str | None = None  # "latest" or a checkpoint path
    progress: bool = True
    threads: int = 1  # torch threads per process; 1 is robust on a shared CPU (no OpenMP spin contention)

    def validate(self, world: int = 1, local_rank: int = 0) -> None:
        """Check the flags before anything loads; a CUDA device asked for where there is none fails here."""
        if self.steps < 1:
            raise Blip2Error(f"--steps must be >= 1 (got {self.steps})")
        if self.batch_size % world:
            raise Blip2Error(f"--batch-size {self.batch_size} must be divisible by the number of processes {world}")
        if self.precision not in PRECISIONS:
            raise Blip2Error(f"--precision {self.precision!r}: choose {', '.join(PRECISIONS)}")
        check_device_choice(self.device)
        resolve_device(self.device, world, local_rank)


class Task(Protocol):
    name: str
    n_train: int

    def build(self) -> nn.Module: ...  # forward(**batch) -> (loss, {name: tensor})
    def batch(self, indices: torch.Tensor, step: int) -> dict[str, Any]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def save(self, model: nn.Module, folder: Path) -> None: ...
    def describe(self) -> dict[str, Any]: ...


# -------------------------------------------------------------------------------------------- helpers


def launch_env() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` of a torchrun launch (``RANK``/``WORLD_SIZE`` set), ``(0, 1, 0)`` otherwise.

    Reads the environment only: nothing is initialised, so it can run before the flags are validated.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def setup_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Under torchrun, join the process group: NCCL when ``device`` is a GPU (made this process's current
    device first), gloo on CPU. Return ``(rank, world)``; ``(0, 1)`` for one process."""
    _, world, _ = launch_env()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the global generators (CPU and CUDA) for one optimizer step of one rank.

    Reseeding at every step makes dropout and any other global-RNG use a function of (seed, step, rank):
    a resumed run draws what the uninterrupted one drew, on any device, with no generator state saved.
    """
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or "query_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: LoopConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


class DataOrder:
    """Sample position p of the run -> dataset index, from one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(positions)
        epochs = positions // self.n
        for e in epochs.unique().tolist():
            if e not in self._perms:
                self._perms = {k: v for k, v in self._perms.items() if k >= e - 1}
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                self._perms[e] = torch.randperm(self.n, generator=g)
            sel = epochs == e
            out[sel] = self._perms[e][positions[sel] % self.n]
        return out


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, config: dict) -> None:
    """Write the checkpoint to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Every tensor is copied to the CPU first: the file is the same whichever device trained, and loads the
    same way on a machine without a GPU.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Tensors and plain containers only (read back with torch.load(weights_only=True), which runs no
    # code); the run's configuration travels as a JSON string.
    state = {"model": to_cpu(model.state_dict()), "optimizer": to_cpu(optimizer.state_dict()),
             "scheduler": _plain(scheduler.state_dict()), "step": int(step), "config": json.dumps(config)}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plain(state: dict) -> dict:
    """A scheduler state without callables (LambdaLR keeps ``None`` for plain functions already)."""
    return {k: v for k, v in state.items() if not callable(v)}


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint without running code from it (``weights_only``): ``{model, optimizer, scheduler,
    step, config}``. A file holding anything but tensors and plain data is refused in one line.

    The tensors are mapped to the CPU; ``load_state_dict`` then places them on the training device: the
    model copies into its parameters, the optimizer moves its moments to each parameter's device and
    keeps Adam's ``step`` counters on the CPU, where a non-fused AdamW expects them (mapped straight to
    a GPU, they would stay there).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zipfile errors ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Blip2Error(f"--resume {path}: not a checkpoint this trainer can read safely: "
                         f"{''.join(c if c.isprintable() else '?' for c in first)[:200]}",
                         hint="resume only from checkpoints written by blip2-train (tensors and JSON only)") from None
    try:
        config = state["config"]
        out = {k: state[k] for k in ("model", "optimizer", "scheduler")}
        out["step"], out["config"] = int(state["step"]), dict(json.loads(config) if isinstance(config, str) else config)
    except (KeyError, TypeError, ValueError) as e:
        raise Blip2Error(f"--resume {path}: not a blip2-train checkpoint ({type(e).__name__}: {e})") from None
    return out


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        p = out / CKPT_DIR / LATEST
        return p if p.is_file() else None  # nothing yet: start from scratch (open_clip behaviour)
    p = Path(resume)
    if not p.is_file():
        raise Blip2Error(f"--resume {resume}: no such checkpoint", hint="use --resume latest or a .pt path")
    return p


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------- loop


def train(task: Task, cfg: LoopConfig) -> list[dict]:
    """Run ``task`` for ``cfg.steps`` optimizer steps; return the per-step log (rank 0; others: [])."""
    _, world, local_rank = launch_env()
    cfg.validate(world, local_rank)
    device = resolve_device(cfg.device, world, local_rank)
    rank, world = setup_distributed(device)
    dtype = resolve_precision(cfg.precision, device)
    out = Path(cfg.out)
    master = rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if master:
        print(f"[{task.name}] {describe(device, dtype)}", flush=True)
    torch.manual_seed(cfg.seed)
    model = task.build().to(device)  # the trained and the frozen parts; the optimizer follows the params
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # machine-specific choices (device, threads) are not part of the run's identity: a checkpoint
    # written on a GPU resumes on a CPU and the other way round
    run_config = {"task": task.describe(),
                  "loop": dataclasses.asdict(cfg) | {"resume": None, "progress": None, "threads": None,
                                                     "device": None},
                  "world": world}
    step = 0
    ckpt = resolve_resume(cfg.resume, out)
    log_file = out / "metrics.jsonl"
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if json.loads(json.dumps(state["config"]["task"])) != json.loads(json.dumps(run_config["task"])):
            raise Blip2Error(f"checkpoint {ckpt} was written by a different task configuration",
                             hint="resume with the same flags, or start a new --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if master:
            print(f"resumed from {ckpt} at step {step}", flush=True)
            if log_file.is_file():  # drop lines written after the checkpoint by the killed run
                keep = [ln for ln in log_file.read_text().splitlines() if json.loads(ln)["step"] <= step]
                log_file.write_text("".join(k + "\n" for k in keep))
    elif master and log_file.is_file():
        log_file.unlink()
    if master:
        (out / "config.json").write_text(json.dumps(run_config, indent=2))

    if world == 1:
        ddp = model
    elif device.type == "cuda":
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
    autocast = autocast_context(dtype, device.type)
    order = DataOrder(task.n_train, cfg.seed)
    per_rank = cfg.batch_size // world
    history: list[dict] = []
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=task.name, dynamic_ncols=True, mininterval=1.0)
    t0, seen = time.time(), 0

    while step < cfg.steps:
        model.train()
        model.step = step
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size + rank * per_rank
            indices = order(torch.arange(first, first + per_rank))
            batch = move_to(task.batch(indices, step), device)
            sync = contextlib.nullcontext() if (world == 1 or micro == cfg.grad_accum - 1) else ddp.no_sync()
            with sync:
                with autocast():
                    loss, metrics = ddp(**batch)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.clip if cfg.clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += cfg.batch_size * cfg.grad_accum
        if world > 1:  # report the global-batch mean
            vals = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)  # NCCL: on the GPU
            dist.all_reduce(vals)
            totals = dict(zip(totals, (vals / world).tolist()))
        record = {"step": step, **{k: round(v, 6) for k, v in totals.items()},
                  "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6)}
        if master:
            history.append(record)
            _log(log_file, record)
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    rate = seen / max(time.time() - t0, 1e-9)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in totals.items()} | {"img/s": f"{rate:.0f}"})
        if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            if master:
                save_checkpoint(out / CKPT_DIR / LATEST, model, optimizer, scheduler, step, run_config)
            if world > 1:
                dist.barrier()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            _evaluate(task, model, step, master, world, log_file, bar)
    if bar is not None:
        bar.close()
    if master:

        with atomic_directory(out / "model", force=True) as tmp:
            task.save(model, tmp)
    _evaluate(task, model, step, master, world, log_file, None, final=True)
    if world > 1:
        dist.barrier()
    return history


def _evaluate(task, model, step, master, world, log_file, bar, final=False) -> None:
    if master:
        model.eval()
        with torch.no_grad():
            scores = task.evaluate(model)
        if scores:
            line = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
            msg = f"[{task.name}] {'final' if final else 'eval'} step {step}: {line}"
            (bar.write if bar is not None else print)(msg)
            _log(log_file.with_name("eval.jsonl"), {"step": step, "final": final, **scores})
    if world > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
