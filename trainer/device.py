"""Where the training loop runs and at which precision: ``--device`` and ``--precision``, batch moves.

* ``--device auto|cpu|cuda|cuda:N``: ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
  Under torchrun with CUDA every process takes ``cuda:LOCAL_RANK`` (and the process group is NCCL; gloo
  on CPU). A CUDA device asked for where there is none fails before any model loads.
* ``--precision auto|bf16|fp32``: ``auto`` is bf16 autocast on a GPU that has bf16
  (``torch.cuda.is_bf16_supported``) or a CPU with ``avx512_bf16``/``amx_bf16``, else fp32.
* :func:`move_to` moves every tensor of a batch (nested dicts, lists, tuples) to the device, through
  pinned memory and non-blocking copies on CUDA; :func:`to_cpu` brings a state back for checkpoints,
  which are always written from CPU tensors (a checkpoint written on a GPU loads the same way on a CPU).

The CUDA path is written against PyTorch's documented API; its tests (``tests/test_trainer_device.py``)
skip on machines without CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Any

import torch

from runtime.errors import Blip2Error

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "bf16", "fp32")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
NO_CUDA_HINT = "use --device cpu, or install a CUDA build of torch"
NO_GPU_HINT = "use --device cpu, or make a GPU visible (nvidia-smi; CUDA_VISIBLE_DEVICES)"


def check_device_choice(choice: str) -> str:
    """The ``--device`` text, checked for form only (no CUDA call): ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    if not isinstance(choice, str) or not _DEVICE.match(choice):
        raise Blip2Error(f"--device {choice!r}: choose {DEVICE_CHOICES}")
    return choice


def resolve_device(choice: str, world: int = 1, local_rank: int = 0) -> torch.device:
    """The device this process trains on, or a ``Blip2Error`` that says what to change.

    ``world``/``local_rank``: the torchrun launch (1/0 for one process). Under torchrun each process takes
    ``cuda:LOCAL_RANK``, so only ``auto``, ``cpu`` and ``cuda`` are accepted there.
    """
    check_device_choice(choice)
    if world > 1 and choice.startswith("cuda:"):
        raise Blip2Error(f"--device {choice} under torchrun: each process takes cuda:LOCAL_RANK",
                         hint="use --device cuda (or auto) with torchrun; pick the GPUs with CUDA_VISIBLE_DEVICES")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise Blip2Error(f"--device {choice}: this torch ({torch.__version__}) is built without CUDA",
                             hint=NO_CUDA_HINT)
        raise Blip2Error(f"--device {choice}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU",
                         hint=NO_GPU_HINT)
    count = torch.cuda.device_count()
    index = local_rank if world > 1 else int(choice.partition(":")[2] or 0)
    if index >= count:
        what = f"LOCAL_RANK {index}" if world > 1 else f"--device {choice}"
        raise Blip2Error(f"{what}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})",
                         hint="use fewer torchrun processes per node, or another --device")
    return torch.device("cuda", index)


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """The CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``), where autocast bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_bf16_supported(device: torch.device) -> bool:
    """The GPU computes in bf16 natively (Ampere and later), not through emulation."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the keyword
            return bool(torch.cuda.is_bf16_supported())


def autocast_dtype(precision: str, device_type: str, bf16_ok: bool) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device_type`` (``None``: fp32, no autocast).

    ``bf16_ok``: whether the device has bf16 (see :func:`resolve_precision`). ``bf16`` asked for on a GPU
    without it is refused; on a CPU it is emulated, slowly, as it always was here.
    """
    if precision not in PRECISIONS:
        raise Blip2Error(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16" and device_type == "cuda" and not bf16_ok:
        raise Blip2Error("--precision bf16: this GPU has no native bf16 (needs compute capability 8.0+)",
                         hint="use --precision fp32 (or auto)")
    if precision == "bf16" or bf16_ok:
        return torch.bfloat16
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """:func:`autocast_dtype` with the capability of ``device`` read from the machine."""
    ok = cuda_bf16_supported(device) if device.type == "cuda" else cpu_bf16_supported()
    return autocast_dtype(precision, device.type, ok)


def autocast_context(dtype: torch.dtype | None, device_type: str):
    """A factory of the loop's autocast context: ``torch.autocast(device_type, dtype=dtype)``, or no-op for fp32.

    It returns a ``functools.partial`` (built lazily, so nothing CUDA is touched until the loop enters it).
    """
    if dtype is None:
        return functools.partial(contextlib.nullcontext)
    return functools.partial(torch.autocast, device_type, dtype=dtype)


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested in dicts, lists, tuples) on ``device``; other values kept.

    To CUDA: from pinned host memory with ``non_blocking=True`` (the copy overlaps the host's next work;
    the caching host allocator keeps the pinned buffer alive until the copy is done).
    """
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if device.type == "cuda" and obj.device.type == "cpu":
            return obj.pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, move_to(v, device)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it on the CPU (blocking copies): what checkpoints are written from."""
    return move_to(obj, torch.device("cpu"))


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    """One line for the start of a run: ``device cuda:0 (NVIDIA H100), precision bf16 autocast``."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    what = "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"
    return f"device {where}, precision {what}"
