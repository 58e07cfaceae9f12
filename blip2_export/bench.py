"""``blip2-export bench``: the eager model and every bundle backend, timed side by side in one run.

For each backend (``eager``: transformers ``Blip2ForConditionalGeneration.generate``, torch fp32 on
CPU; ``ort-fp32|fp16|int8``: the bundle on ONNX Runtime; ``trt-*``: TensorRT) and each batch size,
on the same images and prompt, with ``min_new_tokens = max_new_tokens`` so every run generates the
same number of tokens:

* stage timings, warm-up then repeated runs, p50/p90/p99: preprocess, vision, qformer (with the
  language projection), prefill (time to the first token), per-token decode, end to end; tokens/s;
  the process's peak resident memory while the backend loaded and warmed up (and its growth);
* per-token decode as the cache grows (``contexts``) and with batch (``batches``);
* a roofline per decode step: bytes of LLM weights (embedding tables excluded: a step reads one row)
  plus KV cache at that context, divided by the memory bandwidth measured on the spot, and the
  fraction of it achieved.

All backends stay loaded and the measured rounds interleave them (every backend, batch and context
once per round), so load from other processes and slow drifts spread over all backends instead of
skewing one ratio. Writes ``report.json``, ``report.md`` (the tables) and ``report.png`` into the
output folder, each through a temporary file. The report carries the load average before and after:
on a shared machine only ratios measured in one run mean something.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.int8_kernels import X86_ARCHS, Int8Kernel, choose, cpu_features
from runtime.contract import GraphName
from runtime.errors import Blip2Error, require
from runtime.precisions import PRECISION_NAMES, TRANSFORMS
from runtime.precisions import PRECISIONS as PRECISION_SPECS

PRECISIONS = PRECISION_NAMES  # from the precision registry (runtime.precisions)
BACKEND_KINDS = ("eager", "ort", "trt")
DEFAULT_BACKENDS = ("eager", "ort-fp32", "ort-fp16", "ort-int8")
BENCH_VOCAB = 50272  # OPT-125M's vocabulary: the bench model's LM head and embedding are OPT-sized
STAGES = ("preprocess", "vision", "qformer", "prefill", "decode_per_token", "e2e")
TARGETS = {"ort-fp32": 0.5, "ort-int8": 0.3}  # end-to-end time vs eager (issue #6)
PEER_TARGETS = {"ort-int8": ("eager-dynint8", 0.6)}  # end-to-end time vs a peer, when both ran (issue #20)
DECODE_PEER_TARGETS = {"ort-int4": ("ort-int8", 0.6)}  # per-token decode p50 vs a peer, batch 1 (issue #16)
WEIGHT_PEER_TARGETS = {"ort-int4": ("ort-int8", 0.55)}  # LLM weight bytes a decode step reads vs a peer (#16)
ROOFLINE_TARGET = 1.5  # per-token decode within this factor of the roofline
CONTEXT_TARGET = 1.2  # decode at the largest context within this factor of the smallest
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    batches: tuple[int, ...] = (1,)
    new_tokens: int = 32
    contexts: tuple[int, ...] = (64, 256, 512)
    warmup: int = 1
    repeats: int = 3
    decode_steps: int = 8  # measured steps per (context, batch) point, after 2 warm-up steps
    threads: int | None = None  # None: every core (torch and ORT get the same count)
    prompt: str = "a photo of"
    progress: bool = True
    device: str = "cpu"  # "cuda": eager in fp16 on the GPU, ort-* on ONNX Runtime's CUDA provider
    int8_kernel: str = "auto"  # ORT int8 weight form (runtime.backends.int8_kernels); auto: exact for this CPU

    def validate(self) -> BenchConfig:
        if self.device not in DEVICES:
            raise Blip2Error(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        Int8Kernel.parse(self.int8_kernel)
        for b in self.backends:
            parse_backend(b)
        if not self.backends:
            raise Blip2Error("--backends is empty; name at least one, e.g. eager,ort-fp32")
        if not self.batches or min(self.batches) < 1:
            raise Blip2Error(f"--batch sizes must be >= 1 (got {list(self.batches)})")
        if self.new_tokens < 2:
            raise Blip2Error(f"--new-tokens must be >= 2 to time decode steps (got {self.new_tokens})")
        if not self.contexts or min(self.contexts) < 2:
            raise Blip2Error(f"--contexts must be positive positions (got {list(self.contexts)})")
        if self.repeats < 1 or self.warmup < 0:
            raise Blip2Error("--repeats must be >= 1 and --warmup >= 0")
        if self.decode_steps < 1:
            raise Blip2Error("--decode-steps must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise Blip2Error("--threads must be >= 1")
        return self

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


# What a CPU user tries first on the eager model, timed beside it: torch's one-line dynamic int8
# (``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``) and ``torch.compile`` of the LLM.
EAGER_PEERS = {"eager-dynint8": "dynint8", "eager-compile": "compile"}


class BackendUnavailable(Blip2Error):
    """A backend that cannot run on this machine (the run goes on without it, saying why)."""


def parse_backend(spec: str) -> tuple[str, str]:
    """``eager`` -> ("eager", "fp32"); ``eager-dynint8`` -> ("eager", "dynint8"); ``ort-int8`` (or
    ``ort-int8@u8u8``) -> ("ort", "int8")."""
    if spec == "eager":
        return "eager", "fp32"
    if spec in EAGER_PEERS:
        return "eager", EAGER_PEERS[spec]
    name, _, form = spec.partition("@")
    kind, _, prec = name.partition("-")
    if kind not in BACKEND_KINDS[1:] or prec not in PRECISIONS:
        choices = ["eager", *EAGER_PEERS] + [f"{k}-{p}" for k in BACKEND_KINDS[1:] for p in PRECISIONS]
        raise Blip2Error(f"unknown backend {spec!r}; choose from: {', '.join(choices)} "
                         "(ort-int8@<int8 kernel> for one int8 weight form)")
    if form and not (kind == "ort" and _int8_activations(prec)):
        forms = [f"ort-{p}" for p in PRECISIONS if _int8_activations(p)]
        raise Blip2Error(f"backend {spec!r}: an int8 kernel form (@{form}) applies to {', '.join(forms)} only")
    if form:
        Int8Kernel.parse(form)
    return kind, prec


def _int8_activations(prec: str) -> bool:
    """Whether some graph of precision ``prec`` takes int8 activations (where the CPU's int8 form applies)."""
    spec = PRECISION_SPECS[prec]
    return any(TRANSFORMS[t].int8_activations for r in spec.transforms for t in spec.transform_names(r))


def backend_int8_kernel(spec: str, default: str) -> str:
    """The int8 weight form of backend ``spec``: its ``@form`` suffix, else ``default`` (--int8-kernel)."""
    return spec.partition("@")[2] or default


# -- measurement helpers ---------------------------------------------------------------------------
def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/min/mean of ``samples`` (seconds) in milliseconds, with the sample count."""
    a = np.asarray(samples, dtype=np.float64) * 1000.0
    if a.size == 0:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "p99": nan, "min": nan, "mean": nan, "n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "min": float(a.min()), "mean": float(a.mean()),
            "n": int(a.size)}


def memory_bandwidth(threads: int, mbytes: int = 256, tries: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of ``tries`` parallel copies (read + write counted) and
    ``tries`` parallel reads (a dot product of each slice with itself) of a ``mbytes`` array.

    numpy releases the GIL in both, so ``threads`` threads each stream their own slice, like the
    backend's threads stream their share of the weights. A decode step mostly reads; on this kind of
    machine a copy reports ~10% less than reads reach (the write-allocate traffic is not counted), and
    an ORT fp32 step was measured streaming its weights faster than the copy figure. Taking the larger
    of the two keeps the roofline strict."""
    src = np.ones(mbytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    sink = np.zeros(threads)

    def copy(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    def read(i: int) -> None:
        part = src[bounds[i]:bounds[i + 1]]
        sink[i] = np.dot(part, part)

    best = 0.0
    for fn, moved in ((copy, 2 * src.nbytes), (read, src.nbytes)):
        for _ in range(tries):
            workers = [threading.Thread(target=fn, args=(i,)) for i in range(threads)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, moved / (time.perf_counter() - t))
    return best


def gpu_memory_bandwidth(mbytes: int = 1024, tries: int = 5) -> float:
    """GPU memory bandwidth in bytes/s: the best of ``tries`` device-to-device copies (read + write)
    of a ``mbytes`` buffer, through torch (the eager baseline's dependency)."""
    torch = _cuda_torch()
    src = torch.empty(mbytes * (1 << 20), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(tries + 1):  # the first copy warms up
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = max(best, 2 * src.numel() / (time.perf_counter() - t))
    del src, dst
    torch.cuda.empty_cache()
    return best


def _cuda_torch():
    """torch with a usable CUDA device, or a one-line error saying what is missing."""
    try:
        import torch
    except ImportError:
        raise Blip2Error("--device cuda needs torch with CUDA (it times the eager baseline and measures GPU "
                         "bandwidth)", hint="pip install torch with CUDA support") from None
    if not torch.cuda.is_available():
        raise Blip2Error("--device cuda: torch sees no CUDA device here",
                         hint="run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    return torch


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak`` is the highest seen (bytes).

    With ``gpu``, also the device's used memory (``cudaMemGetInfo``: every allocator in the process
    counts, torch's, ONNX Runtime's and TensorRT's alike): ``gpu_baseline`` / ``gpu_peak``."""

    def __init__(self, interval: float = 0.005, gpu: bool = False):
        self.proc = require("psutil", "bench").Process()
        self.interval = interval
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._gpu = _cuda_torch() if gpu else None
        self.gpu_baseline = self.gpu_peak = self._gpu_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_used(self) -> int:
        if self._gpu is None:
            return 0
        free, total = self._gpu.cuda.mem_get_info()
        return int(total - free)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.gpu_peak = max(self.gpu_peak, self._gpu_used())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of initializers a decode step reads: all of them except tables only ever indexed by Gather."""
    onnx = require("onnx", "export")
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            users.setdefault(x, set()).add(n.op_type)
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name) == {"Gather"}:
            continue
        total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def kv_bytes(facts, context: int, batch: int, itemsize: int) -> int:
    return 2 * facts.llm_layers * batch * facts.llm_heads * context * facts.head_dim * itemsize


# -- runners ---------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per stage, over every measured run."""

    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, **kw: float | list[float]) -> None:
        for k, v in kw.items():
            self.stages[k].extend(v if isinstance(v, list) else [v])


class _Clock:
    """Marks times of streamed tokens: the first mark ends prefill, the gaps are decode steps."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, *_args) -> None:
        self.marks.append(time.perf_counter())


class RuntimeRunner:
    """A bundle on a runtime backend (ORT or TensorRT), timed through its public API."""

    def __init__(self, bundle: Path, kind: str, precision: str, threads: int, device: str = "cpu",
                 int8_kernel: str = "auto"):
        from runtime.pipeline import Blip2Runtime

        opts: dict[str, Any] = {"threads": threads, "int8_kernel": int8_kernel} if kind == "ort" else {}
        if kind == "ort" and device == "cuda":
            opts["providers"] = ["CUDAExecutionProvider"]
        self.rt = Blip2Runtime(bundle, precision=precision, backend=kind, verify=False, **opts)
        self.facts = self.rt.manifest.model
        self.decoder = self.rt.graph(GraphName.DECODER)
        self.rt.graph(GraphName.VISION)
        self.rt.graph(GraphName.QFORMER)
        self.prefix: np.ndarray | None = None

    def describe(self) -> dict:
        rec = self.decoder.record
        file = getattr(self.decoder, "engine", None) or rec.file
        int8 = getattr(self.rt.graph(GraphName.VISION), "int8", None)
        return {"decoder_file": file, "kv_cache": getattr(self.decoder, "kv_cache", "concat"),
                **({"int8_kernel": int8.kernel.value} if int8 is not None else {}),
                "weight_bytes": onnx_weight_bytes(self.rt.bundle / file),
                "kv_itemsize": np.dtype(getattr(self.decoder, "kv_dtype", rec.io.inputs[0].dtype)).itemsize}

    def e2e(self, images: list, prompt: str, new_tokens: int, t: Timings | None) -> list[list[int]]:
        from runtime.generation import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        clock = _Clock()
        t0 = time.perf_counter()
        pv = self.rt.pixel_values(images)
        t1 = time.perf_counter()
        emb = self.rt.image_embeds(pv)
        t2 = time.perf_counter()
        prefix = self.rt.graph(GraphName.QFORMER).run({"image_embeds": emb})["visual_prefix"]
        t3 = time.perf_counter()
        gens = self.rt.generate(prompts=[prompt] * len(images), prefix=prefix, config=cfg, stream=clock)
        t4 = time.perf_counter()
        self.prefix = prefix
        if t is not None:
            m = clock.marks
            t.add(preprocess=t1 - t0, vision=t2 - t1, qformer=t3 - t2, prefill=m[0] - t3,
                  decode_per_token=list(np.diff(m)), e2e=t4 - t0)
        return [g.token_ids for g in gens]

    def decode_at(self, context: int, batch: int, steps: int, token: int) -> list[float]:
        """Seconds per decode step with ``context`` positions cached, ``batch`` rows."""
        from runtime.decoder_only import DecoderOnlyModel

        q = self.facts.num_query_tokens
        assert self.prefix is not None
        prefix = np.repeat(self.prefix[:1], batch, axis=0)
        embed = self.rt.embed
        assert embed is not None
        sm = DecoderOnlyModel(self.rt.manifest, self.decoder, embed, prefix,
                              [[token] * (context - q)] * batch, max_new_tokens=steps + 2)
        _, state = sm.prefill()
        toks = np.full(batch, token, dtype=np.int64)
        times = []
        for i in range(steps + 2):
            s = time.perf_counter()
            _, state = sm.step(toks, state)
            if i >= 2:
                times.append(time.perf_counter() - s)
        return times


class EagerRunner:
    """transformers ``Blip2ForConditionalGeneration``, stages timed by forward hooks: torch fp32 on the
    CPU, or fp16 on the GPU (``device="cuda"``; the Q-Former stays fp32 as transformers keeps it), with
    the device synchronized at every time mark."""

    def __init__(self, checkpoint: Path, threads: int, device: str = "cpu", variant: str = "fp32"):
        import torch

        from blip2_export.modelzoo import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.cuda = device == "cuda"
        self.variant = variant
        if variant not in ("fp32", *EAGER_PEERS.values()):
            raise Blip2Error(f"unknown eager variant {variant!r}")
        if variant != "fp32" and self.cuda:
            raise BackendUnavailable(f"the {variant} eager peer is a CPU one; bench it with --device cpu")
        self.model, self.tokenizer, self.processor = load_checkpoint(
            checkpoint, dtype="float16" if self.cuda else "float32")
        self.model = self.model.to(device).eval()
        self.dtype = torch.float16 if self.cuda else torch.float32
        cfg = self.model.config
        if not cfg.use_decoder_only_language_model:
            raise Blip2Error("bench times decoder-only (OPT) models only")
        if variant == "dynint8":  # the one line a CPU user tries first, on every Linear
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        elif variant == "compile":
            self._compile()
        self.nq, self.image_id = cfg.num_query_tokens, cfg.image_token_index
        self.marks: dict[str, float] = {}
        for name, mod, when in (("vision_start", self.model.vision_model, "pre"),
                                ("vision_end", self.model.vision_model, "post"),
                                ("qformer_end", self.model.language_projection, "post")):
            self._hook(mod, name, when)
        self.prefix: Any = None

    def _compile(self) -> None:
        """``torch.compile`` the LLM's forward (what generate calls every step), checked on a short input
        here so that a machine where it cannot work (no C++ compiler, ...) says so instead of failing later."""
        torch = self.torch
        lm = self.model.language_model
        lm.forward = torch.compile(lm.forward, dynamic=True)
        try:
            with torch.no_grad():
                lm(inputs_embeds=torch.zeros(1, 3, lm.config.hidden_size))
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds
            raise BackendUnavailable(f"torch.compile does not work here: {str(e).splitlines()[0][:160]}") from None

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _hook(self, module, name: str, when: str) -> None:
        def mark(*_a, **_k):
            self._sync()
            self.marks[name] = time.perf_counter()

        if when == "pre":
            module.register_forward_pre_hook(mark)
        else:
            module.register_forward_hook(mark)

    def describe(self) -> dict:
        lm = self.model.language_model
        emb = {id(p) for m in lm.modules() if isinstance(m, self.torch.nn.Embedding) for p in m.parameters()}
        weights = sum(p.numel() * p.element_size() for p in lm.parameters() if id(p) not in emb)
        for m in lm.modules():  # dynamic int8 Linear layers keep their packed weights outside parameters()
            if isinstance(m, self.torch.ao.nn.quantized.dynamic.Linear):
                w, b = m.weight(), m.bias()
                weights += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        return {"decoder_file": None, "kv_cache": "transformers DynamicCache", "weight_bytes": int(weights),
                "kv_itemsize": 2 if self.cuda else 4, "eager_variant": self.variant}

    def e2e(self, images: list, prompt: str, new_tokens: int, t: Timings | None) -> list[list[int]]:
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        clock = _Clock()
        sync = self._sync

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):  # called with the prompt first, then once per new token
                if self.first:
                    self.first = False
                    return
                sync()
                clock()

            def end(self):
                pass

        t0 = time.perf_counter()
        pv = self.processor(images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        self._sync()
        t1 = time.perf_counter()
        ids = torch.tensor([[self.image_id] * self.nq + self.tokenizer(prompt).input_ids] * len(images),
                           device=self.device)
        with torch.no_grad():
            out = self.model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      num_beams=1, streamer=Streamer())
        gen = out[:, ids.shape[1]:]
        self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        t4 = time.perf_counter()
        if t is not None:
            m = clock.marks
            t.add(preprocess=t1 - t0, vision=self.marks["vision_end"] - self.marks["vision_start"],
                  qformer=self.marks["qformer_end"] - self.marks["vision_end"],
                  prefill=m[0] - self.marks["qformer_end"], decode_per_token=list(np.diff(m)), e2e=t4 - t0)
        if self.prefix is None:  # the visual prefix of the first image, for the decode sweep
            from blip2_export.graphs import QFormerGraph

            with torch.no_grad():
                self.prefix = QFormerGraph(self.model)(self.model.vision_model(pixel_values=pv[:1]).last_hidden_state)
                self.prefix = self.prefix.to(self.dtype)
        return gen.tolist()

    def decode_at(self, context: int, batch: int, steps: int, token: int) -> list[float]:
        torch = self.torch
        lm = self.model.language_model
        embed = lm.get_input_embeddings()
        dev = self.device
        with torch.no_grad():
            prefix = self.prefix.expand(batch, -1, -1)
            ids = torch.full((batch, context - self.nq), token, dtype=torch.long, device=dev)
            x = torch.cat([prefix, embed(ids)], dim=1)
            out = lm(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=dev),
                     use_cache=True)
            past, n = out.past_key_values, x.shape[1]
            step_in = embed(torch.full((batch, 1), token, dtype=torch.long, device=dev))
            times = []
            for i in range(steps + 2):
                self._sync()
                s = time.perf_counter()
                out = lm(inputs_embeds=step_in, attention_mask=torch.ones((batch, n + 1), dtype=torch.long, device=dev),
                         past_key_values=past, use_cache=True)
                self._sync()
                past, n = out.past_key_values, n + 1
                if i >= 2:
                    times.append(time.perf_counter() - s)
        return times


# -- the benchmark ---------------------------------------------------------------------------------
def machine_info(device: str = "cpu", int8_kernel: str = "auto") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    feats = cpu_features()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                            "arch": platform.machine(), "python": platform.python_version(),
                            "cpu_class": feats["class"], "cpu_features": feats["features"]}
    if device == "cpu":
        try:
            info["int8_kernel"] = choose(int8_kernel).describe()  # the form ort-int8 runs in (no @form)
        except Blip2Error:
            pass
    try:
        info["ram_gb"] = round(require("psutil", "bench").virtual_memory().total / 2**30, 1)
    except Blip2Error:
        pass
    for mod in ("onnxruntime", "torch", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device == "cuda":
        torch = _cuda_torch()
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _unavailable(kind: str, precision: str, bundle: Path, checkpoint: Path | None,
                 device: str = "cpu") -> str | None:
    """Why backend (kind, precision) cannot run here, or None."""
    if kind == "eager":
        if checkpoint is None or not (Path(checkpoint) / "config.json").is_file():
            return f"no checkpoint at {checkpoint} (eager needs MODEL_DIR)"
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return "not available here: torch/transformers not installed"
        return None
    if kind == "ort" and device == "cuda":
        ort = require("onnxruntime", "cpu")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("not available here: this onnxruntime has no CUDAExecutionProvider "
                    "(pip install 'blip2-export[gpu]')")
    if kind == "trt":
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            trt = None
        if trt is None or not hasattr(trt, "Builder"):  # an empty namespace package is not TensorRT
            return "not available here: tensorrt not installed"
        if importlib.util.find_spec("runtime.backends.trt") is None:
            return "not available here: this build has no TensorRT runtime backend"
        if device == "cpu":
            return "TensorRT runs on the GPU: bench it with --device cuda (beside the fp16 GPU eager baseline)"
    from runtime.manifest import load_manifest

    m = load_manifest(bundle, verify=False)
    if precision not in m.graphs:
        return (f"bundle has no {precision} graphs (it has: {', '.join(m.precisions())}); "
                f"run 'blip2-export build BUNDLE --precision {precision}'")
    return None


def run_bench(checkpoint: str | Path | None, bundle: str | Path, config: BenchConfig, *, images: list | None = None,
              echo: Callable[[str], None] | None = None) -> dict:
    """Run every backend of ``config`` and return the report (see :func:`write_report`)."""
    from blip2_export.parity import list_images
    from runtime.manifest import load_manifest

    config.validate()
    if config.device == "cuda":
        _cuda_torch()  # fails in one line, before any long work, where there is no usable GPU
    bundle = Path(bundle)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    manifest = load_manifest(bundle)
    facts = manifest.model
    ctx_limit = facts.max_context - config.decode_steps - 2
    bad = [c for c in config.contexts if not facts.num_query_tokens + 1 <= c <= ctx_limit]
    if bad:
        raise Blip2Error(f"--contexts {bad} outside [{facts.num_query_tokens + 1}, {ctx_limit}] for this bundle "
                         f"(context {facts.max_context}, {facts.num_query_tokens} visual tokens)",
                         hint="lower --contexts or export the bundle with a larger --max-context")
    manifest.dims["batch"].check("batch", max(config.batches), "--max-batch")
    threads = config.thread_count
    images = list(images) if images is not None else list_images(None, max(config.batches))
    while len(images) < max(config.batches):
        images = images + images
    token = facts.bos_token_id if facts.bos_token_id is not None else 5

    report: dict[str, Any] = {
        "machine": machine_info(config.device, config.int8_kernel),
        "load_average_start": list(os.getloadavg()),
        "settings": {**asdict(config), "threads": threads, "bundle": str(bundle),
                     "checkpoint": str(checkpoint) if checkpoint else None},
        "model": {"llm": facts.llm_type, "llm_layers": facts.llm_layers, "llm_hidden": facts.llm_hidden,
                  "vocab": facts.vocab_size, "image_size": facts.image_size, "vision_hidden": facts.vision_hidden,
                  "num_query_tokens": facts.num_query_tokens, "max_context": facts.max_context},
    }
    runs_per_round = len(config.batches) * (1 + len(config.contexts))
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(config.backends) * runs_per_round * (config.warmup + config.repeats), unit="run",
                   desc="bench")
    results: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    # 1. load each backend and run its warm-up alone, so its memory can be attributed to it
    for spec in config.backends:
        kind, prec = parse_backend(spec)
        reason = _unavailable(kind, prec, bundle, checkpoint, config.device)
        if reason is not None:
            results[spec] = {"status": "skipped", "reason": reason}
            if echo:
                echo(f"{spec}: skipped ({reason})")
            if bar is not None:
                bar.update(runs_per_round * (config.warmup + config.repeats))
            continue
        if bar is not None:
            bar.set_description(f"load {spec}")
        try:
            runners[spec], results[spec] = _load_backend(kind, prec, checkpoint, bundle, config, images, token,
                                                         bar, backend_int8_kernel(spec, config.int8_kernel))
        except BackendUnavailable as e:
            results[spec] = {"status": "skipped", "reason": str(e)}
            if echo:
                echo(f"{spec}: skipped ({e})")
            if bar is not None:
                bar.update(runs_per_round * (config.warmup + config.repeats))
    # 2. measured rounds: every backend, batch and context once per round, backends interleaved, so slow
    # drifts and bursts of load from other processes spread over all of them instead of skewing one ratio
    def measure_bandwidth() -> float:
        return gpu_memory_bandwidth() if config.device == "cuda" else memory_bandwidth(threads)

    bandwidth = [measure_bandwidth()]  # sampled again after each round; the roofline uses the best
    timings = {spec: {b: Timings() for b in config.batches} for spec in runners}
    sweep = {spec: {(b, c): [] for b in config.batches for c in config.contexts} for spec in runners}
    for _ in range(config.repeats):
        for spec, runner in runners.items():
            if bar is not None:
                bar.set_description(spec)
            for batch in config.batches:
                runner.e2e(images[:batch], config.prompt, config.new_tokens, timings[spec][batch])
                if bar is not None:
                    bar.update(1)
            for (batch, ctx), times in sweep[spec].items():
                times += runner.decode_at(ctx, batch, config.decode_steps, token)
                if bar is not None:
                    bar.update(1)
        bandwidth.append(measure_bandwidth())
    if bar is not None:
        bar.close()
    for spec in runners:
        _summarise(results[spec], timings[spec], sweep[spec], config, facts)
    runners.clear()
    gc.collect()
    report["bandwidth_samples_gb_s"] = [b / 1e9 for b in bandwidth]
    report["bandwidth_gb_s"] = max(bandwidth) / 1e9
    _roofline(results, facts, max(bandwidth))
    report["backends"] = results
    report["load_average_end"] = list(os.getloadavg())
    _ratios(report)
    report["targets"] = evaluate_targets(report)
    return report


def _load_backend(kind, prec, checkpoint, bundle, config: BenchConfig, images, token, bar,
                  int8_kernel: str = "auto") -> tuple[Any, dict]:
    """Load a backend and run its warm-up (every batch and context), measuring the memory it adds."""
    gc.collect()
    with PeakMemory(gpu=config.device == "cuda") as mem:
        runner: Any = (EagerRunner(checkpoint, config.thread_count, config.device, prec) if kind == "eager"
                       else RuntimeRunner(bundle, kind, prec, config.thread_count, config.device, int8_kernel))
        for _ in range(config.warmup):
            for batch in config.batches:
                runner.e2e(images[:batch], config.prompt, config.new_tokens, None)
                if bar is not None:
                    bar.update(1)
                for ctx in config.contexts:
                    runner.decode_at(ctx, batch, config.decode_steps, token)
                    if bar is not None:
                        bar.update(1)
        if config.warmup == 0:  # still one run, for the visual prefix the decode sweep uses
            runner.e2e(images[:1], config.prompt, 2, None)
    info = runner.describe()
    out: dict[str, Any] = {"status": "ok", "precision": "fp16" if kind == "eager" and config.device == "cuda"
                           else prec, "device": config.device, **info,
                           "peak_rss_mb": mem.peak / 2**20, "peak_growth_mb": (mem.peak - mem.baseline) / 2**20}
    if config.device == "cuda":
        out["gpu_peak_mb"] = mem.gpu_peak / 2**20
        out["gpu_peak_growth_mb"] = (mem.gpu_peak - mem.gpu_baseline) / 2**20
    return runner, out


def _summarise(out: dict, timings: dict, sweep: dict, config: BenchConfig, facts) -> None:
    out["e2e"], out["decode_sweep"] = {}, []
    for batch, t in timings.items():
        stages = {s: percentiles(v) for s, v in t.stages.items()}
        out["e2e"][str(batch)] = {
            "stages_ms": stages,
            "tokens_per_s": batch * config.new_tokens / (stages["e2e"]["p50"] / 1000.0),
            "decode_tokens_per_s": batch / (stages["decode_per_token"]["p50"] / 1000.0),
        }
    for (batch, ctx), times in sweep.items():
        need = out["weight_bytes"] + kv_bytes(facts, ctx, batch, out["kv_itemsize"])
        out["decode_sweep"].append({"batch": batch, "context": ctx, "ms": percentiles(times), "bytes_per_step": need})


def _roofline(results: dict, facts, bandwidth: float) -> None:
    for r in results.values():
        for sw in r.get("decode_sweep", []):
            sw["roofline_ms"] = sw["bytes_per_step"] / bandwidth * 1000.0
            sw["roofline_fraction"] = sw["roofline_ms"] / sw["ms"]["p50"]
            sw["roofline_fraction_best"] = sw["roofline_ms"] / sw["ms"]["min"]


def _ratios(report: dict) -> None:
    eager = report["backends"].get("eager", {})
    for r in report["backends"].values():
        if r.get("status") != "ok":
            continue
        for batch, e in r["e2e"].items():
            base = eager.get("e2e", {}).get(batch) if eager.get("status") == "ok" else None
            e["e2e_vs_eager"] = e["stages_ms"]["e2e"]["p50"] / base["stages_ms"]["e2e"]["p50"] if base else None
        sweep = [s for s in r["decode_sweep"] if s["batch"] == min(x["batch"] for x in r["decode_sweep"])]
        if len(sweep) >= 2:
            lo, hi = sweep[0], sweep[-1]
            r["context_growth"] = {"from": lo["context"], "to": hi["context"], "ratio": hi["ms"]["p50"] / lo["ms"]["p50"],
                                   "ratio_best": hi["ms"]["min"] / lo["ms"]["min"]}


def evaluate_targets(report: dict) -> list[dict]:
    """Issue #6's targets, measured in this run (batch 1 where it was run, else the smallest batch).

    End to end and decode vs context: ratios of p50s measured in interleaved rounds (load from other
    processes lands on both sides). Decode vs roofline: the best decode step against the best bandwidth
    sample, both the machine's uncontended capability (the p50 figure is reported beside it).
    """
    out = []
    backends = report["backends"]

    x86_cpu = (report.get("settings", {}).get("device", "cpu") == "cpu"
               and report.get("machine", {}).get("arch", "").lower() in X86_ARCHS)
    for spec, limit in TARGETS.items():
        r = backends.get(spec, {})
        if r.get("status") != "ok":
            out.append({"target": f"{spec} end to end <= {limit}x eager", "value": None, "met": None,
                        "note": r.get("reason", "not run")})
            continue
        batch = min(r["e2e"], key=int)
        v = r["e2e"][batch].get("e2e_vs_eager")
        out.append({"target": f"{spec} end to end <= {limit}x eager (batch {batch})", "value": v,
                    "met": None if v is None else v <= limit})
    for spec, (peer, limit) in PEER_TARGETS.items():  # ahead of what a CPU user tries first
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            batch = min(set(r["e2e"]) & set(p["e2e"]), key=int)
            v = r["e2e"][batch]["stages_ms"]["e2e"]["p50"] / p["e2e"][batch]["stages_ms"]["e2e"]["p50"]
            out.append({"target": f"{spec} end to end <= {limit}x {peer} (batch {batch})", "value": v,
                        "met": v <= limit})
    for spec, (peer, limit) in DECODE_PEER_TARGETS.items():
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            batch = min(set(r["e2e"]) & set(p["e2e"]), key=int)
            ms = [b["e2e"][batch]["stages_ms"]["decode_per_token"]["p50"] for b in (r, p)]
            out.append({"target": f"{spec} decode step <= {limit}x {peer} (batch {batch}, p50)",
                        "value": ms[0] / ms[1], "met": ms[0] / ms[1] <= limit,
                        "note": f"{ms[0]:.1f} ms vs {ms[1]:.1f} ms"})
    for spec, (peer, limit) in WEIGHT_PEER_TARGETS.items():
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            v = r["weight_bytes"] / p["weight_bytes"]
            out.append({"target": f"{spec} LLM weight bytes <= {limit}x {peer}", "value": v, "met": v <= limit,
                        "note": f"{r['weight_bytes'] / 1e6:.1f} MB vs {p['weight_bytes'] / 1e6:.1f} MB"})
    for spec, r in backends.items():
        if r.get("status") != "ok" or not spec.startswith(("ort", "trt")):
            continue
        first = min(r["decode_sweep"], key=lambda s: (s["batch"], s["context"]))
        x = first["ms"]["min"] / first["roofline_ms"]
        note = f"p50: {first['ms']['p50'] / first['roofline_ms']:.2f}x"
        if x86_cpu and spec == "ort-fp16":
            note += ("; x86 CPU: ONNX Runtime has no fp16 matmul kernels here and runs fp16 on fp32 copies of the "
                     "weights, reading twice the bytes this roofline counts")
        out.append({"target": f"{spec} decode within {ROOFLINE_TARGET}x roofline (batch {first['batch']}, "
                              f"context {first['context']}, best step)", "value": x, "met": x <= ROOFLINE_TARGET,
                    "note": note})
        if "context_growth" in r:
            g = r["context_growth"]
            out.append({"target": f"{spec} decode at context {g['to']} <= {CONTEXT_TARGET}x context {g['from']} "
                                  "(p50)", "value": g["ratio"], "met": g["ratio"] <= CONTEXT_TARGET,
                        "note": f"best steps: {g['ratio_best']:.2f}x"})
    return out


# -- report ----------------------------------------------------------------------------------------
def render_markdown(report: dict) -> str:
    m, s, md = report["machine"], report["settings"], report["model"]
    la0, la1 = report["load_average_start"], report["load_average_end"]
    cuda = s.get("device") == "cuda"
    gpu = (f" GPU: {m.get('gpu')} ({m.get('gpu_memory_gb')} GB), CUDA {m.get('cuda')}; eager runs fp16 on it "
           "(Q-Former fp32), ort-* on ONNX Runtime's CUDA provider." if cuda else "")
    bw = ("GPU memory bandwidth measured now (device-to-device copy, read + write; "
          if cuda else "Memory bandwidth measured now (best of a copy, read + write, and a read; ")
    lines = [
        "## blip2-export bench",
        "",
        (f"Machine: {m.get('cpu')} ({m.get('cpu_class', '?')}: {' '.join(m.get('cpu_features', [])) or '-'}), "
         f"{m.get('cores')} cores, {m.get('ram_gb', '?')} GB RAM, {m.get('platform')}; "
         + (f"int8 kernel form {m['int8_kernel']}; " if m.get("int8_kernel") else "") +
         f"onnxruntime {m.get('onnxruntime', '-')}, torch {m.get('torch', '-')}, transformers "
         f"{m.get('transformers', '-')}.{gpu} Threads: {s['threads']} (torch and ORT). Load average "
         f"{la0[0]:.1f} at start, {la1[0]:.1f} at end. {bw}"
         f"best of {len(report['bandwidth_samples_gb_s'])} samples taken between rounds): "
         f"{report['bandwidth_gb_s']:.1f} GB/s."),
        "",
        (f"Model: {md['llm']} LLM, {md['llm_layers']} layers x {md['llm_hidden']}, vocab {md['vocab']}; "
         f"vision {md['image_size']} px x {md['vision_hidden']}. Prompt {s['prompt']!r}, {s['new_tokens']} new "
         f"tokens (min = max), {s['warmup']} warm-up + {s['repeats']} measured rounds, backends interleaved "
         f"round by round. Peak RSS{' and GPU memory' if cuda else ''}: while the backend loaded and warmed up "
         f"(growth: over the figure before)."),
        "",
        "### End to end (milliseconds, p50 unless noted)",
        "",
        ("| backend | batch | preprocess | vision | qformer | prefill | decode/token p50 (p90, p99) "
         f"| e2e p50 (p90, p99) | tokens/s | peak RSS MB (+growth){'; GPU MB (+growth)' if cuda else ''} "
         "| e2e vs eager |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for spec, r in report["backends"].items():
        if r.get("status") != "ok":
            skipped.append(f"- `{spec}`: skipped, {r['reason']}")
            continue
        for batch, e in r["e2e"].items():
            st = e["stages_ms"]
            d, t = st["decode_per_token"], st["e2e"]
            ratio = e.get("e2e_vs_eager")
            lines.append(
                f"| {spec} | {batch} | {st['preprocess']['p50']:.1f} | {st['vision']['p50']:.1f} | "
                f"{st['qformer']['p50']:.1f} | {st['prefill']['p50']:.1f} | {d['p50']:.1f} ({d['p90']:.1f}, "
                f"{d['p99']:.1f}) | {t['p50']:.0f} ({t['p90']:.0f}, {t['p99']:.0f}) | {e['tokens_per_s']:.1f} | "
                f"{r['peak_rss_mb']:.0f} (+{r['peak_growth_mb']:.0f})"
                + (f"; {r['gpu_peak_mb']:.0f} (+{r['gpu_peak_growth_mb']:.0f})" if "gpu_peak_mb" in r else "")
                + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "### Per-token decode vs context and batch (roofline = bytes read per step / bandwidth)", "",
              ("| backend | batch | context | decode ms p50 (p90, best) | MB read/step | roofline ms "
              "| achieved fraction p50 (best) |"),
              "|---|---|---|---|---|---|---|"]
    for spec, r in report["backends"].items():
        if r.get("status") != "ok":
            continue
        for sw in r["decode_sweep"]:
            lines.append(f"| {spec} | {sw['batch']} | {sw['context']} | {sw['ms']['p50']:.1f} ({sw['ms']['p90']:.1f}, "
                         f"{sw['ms']['min']:.1f}) "
                         f"| {sw['bytes_per_step'] / 1e6:.0f} | {sw['roofline_ms']:.1f} | "
                         f"{sw['roofline_fraction']:.2f} ({sw['roofline_fraction_best']:.2f}) |")
    lines += ["", "### Targets (issue #6), measured in this run", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}x"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {v} | {met}{' (' + t['note'] + ')' if t.get('note') else ''} |")
    if skipped:
        lines += ["", "Skipped:", *skipped]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Decode time vs context (with rooflines) and the end-to-end stage breakdown, in one PNG."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in report["backends"].items() if v.get("status") == "ok"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (spec, r) in enumerate(ok.items()):
        color = f"C{i}"
        for batch in sorted({s["batch"] for s in r["decode_sweep"]}):
            pts = [s for s in r["decode_sweep"] if s["batch"] == batch]
            style = "-o" if batch == min(s["batch"] for s in r["decode_sweep"]) else ":s"
            a1.plot([p["context"] for p in pts], [p["ms"]["p50"] for p in pts], style, color=color,
                    label=f"{spec} b{batch}")
            a1.plot([p["context"] for p in pts], [p["roofline_ms"] for p in pts], "--", color=color, alpha=0.5,
                    label=f"{spec} b{batch} roofline")
    a1.set_xlabel("context (cached positions)")
    a1.set_ylabel("ms per decode step (p50)")
    a1.set_title("Per-token decode vs context")
    a1.legend(fontsize=6, ncol=2)
    parts = ("preprocess", "vision", "qformer", "prefill", "decode")
    names = list(ok)
    bottoms = np.zeros(len(names))
    for j, part in enumerate(parts):
        vals = []
        for spec in names:
            e = ok[spec]["e2e"][min(ok[spec]["e2e"], key=int)]["stages_ms"]
            vals.append(e["decode_per_token"]["p50"] * (e["decode_per_token"]["n"] and
                                                        report["settings"]["new_tokens"] - 1)
                        if part == "decode" else e[part]["p50"])
        a2.bar(names, vals, bottom=bottoms, label=part, color=f"C{j}")
        bottoms += np.asarray(vals)
    a2.set_ylabel("ms (p50), smallest batch")
    a2.set_title("End to end by stage")
    a2.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``out``; each appears only when complete."""
    from runtime.integrity import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=float))
    atomic_write_text(paths["md"], render_markdown(report))
    plot(report, paths["png"])
    for p in paths.values():
        p.chmod(0o644)
    return paths


def build_bench_model(model_dir: str | Path, bundle: str | Path, preset: str = "bench", *, max_context: int = 640,
                      max_batch: int = 8, echo: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    """Build a random checkpoint of ``preset`` at ``model_dir`` and its bundle at ``bundle``, unless present.

    The ``bench`` preset gets OPT-125M's vocabulary size (synthetic words) so its embedding and LM head
    weigh what a real small BLIP-2's do. Same preset and seed: same weights, so anyone can reproduce."""
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import get_spec, make_random_checkpoint

    model_dir, bundle = Path(model_dir), Path(bundle)
    if not (model_dir / "config.json").is_file():
        extra = {}
        if preset == "bench":
            from blip2_export.text_tokenizer import build_word_tokenizer

            base = len(build_word_tokenizer())  # the word tokenizer's own vocabulary
            extra["extra_words"] = tuple(f"w{i:05d}" for i in range(BENCH_VOCAB - base))
        get_spec(preset, **extra)
        if echo:
            echo(f"building the random '{preset}' checkpoint at {model_dir}")
        tmp = model_dir.with_name(f".{model_dir.name}.tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        make_random_checkpoint(tmp, preset, seed=0, **extra)
        os.replace(tmp, model_dir)
    elif echo:
        echo(f"reusing the checkpoint at {model_dir}")
    if not (bundle / "manifest.json").is_file():
        if echo:
            echo(f"exporting it to {bundle}")
        export_bundle(model_dir, bundle, ExportConfig(max_context=max_context, max_batch=max_batch), progress=True)
    elif echo:
        echo(f"reusing the bundle at {bundle}")
    return model_dir, bundle
