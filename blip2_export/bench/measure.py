"""Measuring instruments: percentiles, memory bandwidth, peak memory, weight and KV bytes, the machine."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.int8_kernels import choose, cpu_features
from runtime.errors import Blip2Error, require


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
    torch = cuda_torch()
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


def cuda_torch():
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
        self._gpu = cuda_torch() if gpu else None
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
    from runtime.graph_check import stored_bytes

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            users.setdefault(x, set()).add(n.op_type)
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name) == {"Gather"}:
            continue
        total += stored_bytes(t.data_type, int(np.prod(t.dims, dtype=np.int64)))  # int4: two per byte
    return total


def kv_bytes(facts, context: int, batch: int, itemsize: int) -> int:
    return 2 * facts.llm_layers * batch * facts.llm_heads * context * facts.head_dim * itemsize



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
        torch = cuda_torch()
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


