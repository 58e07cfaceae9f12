"""What a bench run measures: the settings, and the backend specs it accepts (``ort-int8@u8u8``...)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from runtime.backends import backend_names
from runtime.backends.int8_kernels import Int8Kernel
from runtime.errors import Blip2Error
from runtime.precisions import PRECISION_NAMES, TRANSFORMS
from runtime.precisions import PRECISIONS as PRECISION_SPECS

PRECISIONS = PRECISION_NAMES  # from the precision registry (runtime.precisions)
BACKEND_KINDS = ("eager", *backend_names())  # eager: the transformers model; the rest: runtime backends
DEFAULT_BACKENDS = ("eager", "ort-fp32", "ort-fp16", "ort-int8")
STAGES = ("preprocess", "vision", "qformer", "prefill", "decode_per_token", "e2e")
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
    if form and not (kind == "ort" and int8_activations(prec)):
        forms = [f"ort-{p}" for p in PRECISIONS if int8_activations(p)]
        raise Blip2Error(f"backend {spec!r}: an int8 kernel form (@{form}) applies to {', '.join(forms)} only")
    if form:
        Int8Kernel.parse(form)
    return kind, prec


def int8_activations(prec: str) -> bool:
    """Whether some graph of precision ``prec`` takes int8 activations (where the CPU's int8 form applies)."""
    spec = PRECISION_SPECS[prec]
    return any(TRANSFORMS[t].int8_activations for r in spec.transforms for t in spec.transform_names(r))


def backend_int8_kernel(spec: str, default: str) -> str:
    """The int8 weight form of backend ``spec``: its ``@form`` suffix, else ``default`` (--int8-kernel)."""
    return spec.partition("@")[2] or default


