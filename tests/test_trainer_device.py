"""``--device`` and ``--precision`` of the training loop (issue 19): CPU always, CUDA where there is one.

On every machine: ``--device auto`` without a visible GPU trains exactly as ``--device cpu``; ``--device cuda``
where there is no CUDA fails in the flags' validation, before any data or model loads, saying what to
change; batches move to the device with every nested tensor; the autocast factory is built for the
device type without touching CUDA; a resumed run draws the same dropout masks as an uninterrupted one.

With a CUDA GPU (skipped elsewhere, "needs a CUDA GPU"): the demo model fine-tunes on the GPU (loss
finite and falling), its checkpoint holds CPU tensors only and resumes on the CPU, the output loads on the
CPU and exports; a stage-2 run trains with bf16 autocast; two GPUs under torchrun (NCCL) match one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.errors import Blip2Error
from trainer import device as dev
from trainer import train as loop

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "blip2_export" / "assets" / "demo_model"
SIZES = ["vision_hidden=32", "vision_layers=1", "vision_heads=2", "vision_ffn=32", "qformer_hidden=32",
         "qformer_layers=2", "qformer_heads=2", "qformer_ffn=32", "image_size=32", "num_query_tokens=8",
         "llm_hidden=32", "llm_layers=1", "llm_heads=2", "llm_ffn=32"]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _train_cli(*args: str, env: dict[str, str] | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", "29547"] if torchrun else []
    res = subprocess.run([sys.executable, *launch, "-m", "trainer.cli", *args], cwd=ROOT, env=env or _env(),
                         capture_output=True, text=True, timeout=420, check=False)
    return res


def _sizes() -> list[str]:
    return [a for s in SIZES for a in ("--size", s)]


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from trainer.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "d", {"train": 64, "val": 16, "test": 0},
                            image_size=32)


# ------------------------------------------------------------------------------------------ every machine


def test_auto_without_a_visible_gpu_trains_exactly_as_cpu(tiny_data, tmp_path):
    """``auto`` = cuda when torch sees a GPU, else cpu: with no GPU visible it is the CPU run, bit for bit."""
    expected = torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu")
    assert dev.resolve_device("auto") == expected
    no_gpu = _env(CUDA_VISIBLE_DEVICES="")  # hides any GPU from torch, so the comparison runs everywhere
    runs = {}
    for choice in ("auto", "cpu"):
        res = _train_cli("stage1", "--data", str(tiny_data), "--out", str(tmp_path / choice), "--steps", "4",
                         "--batch-size", "8", "--precision", "fp32", "--no-progress", "--warmup", "1",
                         "--lr", "2e-3", "--device", choice, *_sizes(), env=no_gpu)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "[stage1] device cpu, precision fp32" in res.stdout
        runs[choice] = tmp_path / choice
    assert _losses(runs["auto"]) == _losses(runs["cpu"]) and len(_losses(runs["cpu"])) == 4
    a, b = _weights(runs["auto"]), _weights(runs["cpu"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Every training command, called with inputs that would fail as soon as anything is read (empty folders:
# no train.jsonl, no config.json): the device error must come first, from the flags' validation.
_NO_CUDA_SCRIPT = """
import json, sys
from runtime.errors import Blip2Error
from trainer.cli import cli
empty, out = sys.argv[1], sys.argv[2]
commands = {
    "stage1": ["stage1", "--data", empty],
    "stage2": ["stage2", "--data", empty, "--llm", empty],
    "finetune": ["finetune", "--init", empty, "--data", empty],
    "unimodal": ["unimodal", "--data", empty],
}
seen = {}
for name, args in commands.items():
    try:
        cli.main(args=[*args, "--out", out, "--device", "cuda"], standalone_mode=False)
        seen[name] = "no error"
    except Blip2Error as e:
        seen[name] = str(e)
try:
    cli.main(args=["recipe", out, "--device", "cuda:0"], standalone_mode=False)
    seen["recipe"] = "no error"
except Blip2Error as e:
    seen["recipe"] = str(e)
print(json.dumps(seen))
"""


def test_cuda_without_cuda_fails_in_validation_before_anything_loads(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-c", _NO_CUDA_SCRIPT, str(empty), str(tmp_path / "out")], cwd=ROOT,
                         env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(seen) == {"stage1", "stage2", "finetune", "unimodal", "recipe"}
    for name, msg in seen.items():
        assert msg.startswith("--device cuda"), (name, msg)  # not "no train.jsonl" / "no config.json"
        assert "use --device cpu" in msg, (name, msg)
    assert not (tmp_path / "out").exists()  # nothing was written either


def test_device_flag_form_and_torchrun_rules():
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", "mps", ""):
        with pytest.raises(Blip2Error, match="choose auto, cpu, cuda or cuda:N"):
            loop.LoopConfig(out="x", device=bad).validate()
    loop.LoopConfig(out="x", device="cpu").validate()
    assert dev.resolve_device("cpu", world=2, local_rank=1) == torch.device("cpu")  # gloo, as before
    with pytest.raises(Blip2Error, match="each process takes cuda:LOCAL_RANK") as e:
        dev.resolve_device("cuda:1", world=2, local_rank=0)
    assert "--device cuda" in str(e.value.hint)


def test_move_to_moves_every_nested_tensor():
    """Checked on the ``meta`` device (present in every torch build), so a missed tensor stays on the CPU."""
    meta = torch.device("meta")
    t = torch.arange(6).reshape(2, 3)
    batch = {"pixel_values": torch.randn(2, 3, 4, 4), "ids": t, "nested": {"labels": t, "rows": [t, (t, "keep")]},
             "count": 3, "name": "x", "none": None}
    moved = dev.move_to(batch, meta)

    found = list(_all_tensors(moved))
    assert len(found) == len(list(_all_tensors(batch))) == 5
    assert all(x.device == meta for x in found)
    assert all(x.device.type == "cpu" for x in _all_tensors(batch))  # the input is not changed
    assert isinstance(moved["nested"]["rows"], list) and isinstance(moved["nested"]["rows"][1], tuple)
    assert moved["nested"]["rows"][1][1] == "keep" and moved["count"] == 3 and moved["none"] is None
    assert moved["pixel_values"].shape == (2, 3, 4, 4) and moved["ids"].dtype == torch.long
    cpu = torch.device("cpu")
    assert dev.move_to(batch, cpu)["ids"] is t  # already there: no copy


def test_training_forwards_make_their_tensors_on_the_model_device(monkeypatch):
    """Stage 1, stage 2 (OPT) and fine-tune forwards with model and batch on ``meta``: a tensor made on the
    CPU inside them (a mask, a target, the image-token prefix) meets a meta tensor and raises, as it would
    meet a CUDA tensor on a GPU."""
    import dataclasses

    import transformers.masking_utils as mu

    from blip2_export.modelzoo import load_checkpoint
    from trainer.finetune import FinetuneConfig, FinetuneModel
    from trainer.models import TRAINER_SPEC, Stage1, Stage2, make_tokenizer, tokenize

    # transformers drops an all-ones attention mask after reading its values on the host, which a meta
    # tensor cannot give; without that shortcut the same masks are built on the device
    for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
        monkeypatch.setattr(mu, name, lambda *a, **k: False, raising=False)
    meta = torch.device("meta")
    spec = dataclasses.replace(TRAINER_SPEC, **{k: int(v) for k, v in (s.split("=") for s in SIZES)})
    words = ["a", "red", "circle", "circles", "on", "the", "left", "two", "large"]
    captions = ["a red circle on the left", "two large red circles", "a circle", "the left"]

    def batch(tok):
        ids, att = tokenize(tok, captions, eos=True)
        return dev.move_to({"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": att},
                           meta)

    tok = make_tokenizer(words, "qformer")
    s1 = Stage1(spec, tok, ("itc", "itg")).to(meta).train()
    b = batch(tok)
    loss, metrics = s1(**b)
    assert loss.device == meta and set(metrics) == {"itc", "itg"}
    itm = s1.itm_logits(s1.image_embeds(b["pixel_values"]), b["input_ids"], b["attention_mask"])
    assert itm.device == meta and itm.shape == (4, 2)

    tok = make_tokenizer(words, "opt")
    loss, _ = Stage2(spec, tok).to(meta).train()(**batch(tok))
    assert loss.device == meta

    blip, tok, _ = load_checkpoint(DEMO)
    ft = FinetuneModel(blip, FinetuneConfig(init=str(DEMO), data=str(DEMO))).to(meta).train()
    ids, att = tokenize(tok, captions, eos=True)
    labels = ids.masked_fill(att == 0, -100)
    labels[:, :2] = -100  # a two-token prompt
    fb = dev.move_to({"pixel_values": torch.randn(4, 3, 64, 64), "input_ids": ids, "attention_mask": att,
                      "labels": labels}, meta)
    loss, _ = ft(**fb)
    assert loss.device == meta


def test_precision_and_autocast_factory_per_device_type():
    # the decision, for each device type and capability (no CUDA needed: the capability is an argument)
    assert dev.autocast_dtype("auto", "cuda", bf16_ok=True) is torch.bfloat16
    assert dev.autocast_dtype("auto", "cuda", bf16_ok=False) is None
    assert dev.autocast_dtype("fp32", "cuda", bf16_ok=True) is None
    with pytest.raises(Blip2Error, match="no native bf16") as e:
        dev.autocast_dtype("bf16", "cuda", bf16_ok=False)
    assert "--precision fp32" in str(e.value.hint)
    assert dev.autocast_dtype("auto", "cpu", bf16_ok=False) is None
    assert dev.autocast_dtype("bf16", "cpu", bf16_ok=False) is torch.bfloat16  # forced on a CPU, as before
    # the factory for a GPU is built without touching CUDA: it is only called inside the loop
    factory = dev.autocast_context(torch.bfloat16, "cuda")
    assert factory.func is torch.autocast and factory.args == ("cuda",) and factory.keywords == {"dtype": torch.bfloat16}
    # on the CPU the same factory really autocasts, and fp32 really does not
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with dev.autocast_context(torch.bfloat16, "cpu")():
        assert (a @ b).dtype == torch.bfloat16
    with dev.autocast_context(None, "cpu")():
        assert (a @ b).dtype == torch.float32


class _DropoutTask:
    """A task whose model uses the global generator (dropout): resume is exact only if that is restored."""

    name = "dropout"
    n_train = 32

    def __init__(self, crash_at: int | None = None):
        self.crash_at = crash_at
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)

    def build(self):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

            def forward(self, x, y):
                loss = torch.nn.functional.mse_loss(self.net(x), y)
                return loss, {}

        return M()

    def batch(self, indices, step):
        if step == self.crash_at:
            raise KeyboardInterrupt("killed")
        return {"x": self.x[indices], "y": self.y[indices]}

    def evaluate(self, model):
        return {}

    def save(self, model, folder):
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, folder / "w.pt")

    def describe(self):
        return {"task": self.name}


def test_resume_draws_the_same_dropout_masks_as_the_uninterrupted_run(tmp_path):
    def cfg(out):
        return loop.LoopConfig(out=str(out), steps=6, batch_size=8, ckpt_every=3, warmup=1, progress=False,
                               precision="fp32", device="cpu", resume="latest", lr=1e-2)

    ref = loop.train(_DropoutTask(), cfg(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        loop.train(_DropoutTask(crash_at=4), cfg(tmp_path / "cut"))  # dies after the step-3 checkpoint
    resumed = loop.train(_DropoutTask(), cfg(tmp_path / "cut"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref[3:]]
    a = torch.load(tmp_path / "ref" / "model" / "w.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model" / "w.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -------------------------------------------------------------------------------------- with a CUDA GPU


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from trainer.data import generate_vqa_dataset

    return generate_vqa_dataset(tmp_path_factory.mktemp("vqa") / "d", {"train": 64, "val": 8, "test": 0})


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_tensors(v)


@needs_cuda
def test_finetune_on_cuda_learns_and_its_checkpoint_is_cpu_loadable(vqa, tmp_path):
    from blip2_export.export import export_bundle
    from blip2_export.modelzoo import load_checkpoint

    out = tmp_path / "ft"
    args = ["finetune", "--init", str(DEMO), "--data", str(vqa), "--out", str(out), "--batch-size", "16",
            "--lr", "1e-3", "--warmup", "2", "--eval-limit", "8", "--ckpt-every", "10", "--no-progress",
            "--precision", "fp32"]
    res = _train_cli(*args, "--steps", "30", "--device", "cuda")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[finetune] device cuda:0" in res.stdout and "precision fp32" in res.stdout
    losses = _losses(out)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # the resume checkpoint holds CPU tensors only: loaded without map_location on this GPU machine,
    # a tensor saved from the GPU would come back on the GPU
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "scheduler", "step", "config"}
    found = list(_all_tensors(state))
    assert found and all(t.device.type == "cpu" for t in found)
    # ... and resumes on the CPU
    res = _train_cli(*args, "--steps", "31", "--device", "cpu", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "device cpu" in res.stdout
    assert len(_losses(out)) == 31
    # the output loads on the CPU and exports
    blip, _, _ = load_checkpoint(out / "model")
    assert next(blip.parameters()).device.type == "cpu"
    export_bundle(out / "model", tmp_path / "bundle", progress=False)
    assert (tmp_path / "bundle" / "manifest.json").is_file()


@needs_cuda
def test_stage2_on_cuda_with_bf16_autocast(tiny_data, tmp_path):
    if not dev.cuda_bf16_supported(torch.device("cuda", 0)):
        pytest.skip("needs a CUDA GPU with bf16 (compute capability 8.0+)")
    from blip2_export.modelzoo import load_checkpoint
    from trainer.models import generate_captions

    common = ["--batch-size", "16", "--no-progress", "--device", "cuda", *_sizes()]
    res = _train_cli("unimodal", "--data", str(tiny_data), "--out", str(tmp_path / "uni"), "--what", "opt",
                     "--lm-steps", "20", "--lr", "2e-3", "--precision", "bf16", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "s2"
    res = _train_cli("stage2", "--data", str(tiny_data), "--llm", str(tmp_path / "uni" / "opt" / "model"),
                     "--out", str(out), "--steps", "30", "--lr", "2e-3", "--warmup", "2", "--precision", "auto",
                     *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[stage2] device cuda:0" in res.stdout and "precision bf16 autocast" in res.stdout
    losses = _losses(out)
    # (with a random ViT the stage-2 loss hardly moves in 30 steps, on the CPU too: finite is the check)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses), losses
    blip, tok, proc = load_checkpoint(out / "model")  # on the CPU
    llm = _weights(tmp_path / "uni" / "opt")
    saved = {k.removeprefix("language_model."): v for k, v in _weights(out).items() if k.startswith("language_model.")}
    assert saved.keys() == llm.keys() and all(torch.equal(saved[k], llm[k]) for k in llm)  # the LLM stayed frozen
    px = torch.randn(2, 3, proc.size["height"], proc.size["width"])
    assert len(generate_captions(blip, tok, px, max_new_tokens=4)) == 2
    # the loop's factory really autocasts on the GPU
    a = torch.randn(8, 8, device="cuda")
    with dev.autocast_context(torch.bfloat16, "cuda")():
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_under_torchrun_match_one(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--steps", "6", "--batch-size", "8", "--precision", "fp32", "--no-progress",
              "--warmup", "3", "--lr", "2e-3", "--seed", "3", "--device", "cuda", *_sizes()]
    one = _train_cli("stage1", "--out", str(tmp_path / "one"), *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train_cli("stage1", "--out", str(tmp_path / "two"), *common, torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[stage1] device cuda:0" in two.stdout  # rank 0 prints; rank 1 trains on cuda:1
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6 and l1[-1] < l1[0]
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(a)), (l1, l2)
