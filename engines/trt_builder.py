"""TensorRT engines from a bundle's (precision-transformed) ONNX graphs.

Written against the TensorRT 10.x / 11.x Python API: networks are *strongly typed*
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so fp16/int8 come from the graph's own types and
Q/DQ nodes, never from builder flags (TensorRT 11 removed ``BuilderFlag.FP16/INT8`` and calibrators).
One optimization profile per engine, its min/opt/max taken from the manifest's dims (narrowed by
``--max-batch`` / ``--max-context``); a timing cache file is read before and written after every
build so later builds (other graphs, other precisions) skip kernel timing they already did.

Each engine is recorded as an :class:`EngineRecord` with the GPU name, compute capability and TensorRT
version; ``runtime.backends.trt`` refuses an engine from another device, saying to rebuild.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from engines.onnx_utils import fresh_name
from runtime.backends.trt import current_device, require_tensorrt
from runtime.contract import GraphIO
from runtime.errors import Blip2Error
from runtime.integrity import atomic_write_bytes
from runtime.manifest import DimRange, EngineRecord, GraphRecord, file_record

Shape = tuple[int, ...]


def profile_shapes(io: GraphIO, dims: dict[str, DimRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max shape of every graph input, from the contract's symbolic dims and the dim ranges."""
    out = {}
    for spec in io.inputs:
        lo, opt, hi = [], [], []
        for d in spec.dims:
            if isinstance(d, int):
                lo.append(d)
                opt.append(d)
                hi.append(d)
                continue
            if d not in dims:
                raise Blip2Error(f"manifest has no range for dim {d!r} of input {spec.name}")
            r = dims[d]
            lo.append(r.min)
            opt.append(r.opt)
            hi.append(r.max)
        out[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def _progress_monitor(echo: Callable[[str], None], graph: str) -> Any:
    """An ``IProgressMonitor`` printing top-level phases (it must be thread-safe)."""
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    echo(f"  [{graph}] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_engine(onnx_path: Path, out_path: Path, record: GraphRecord, dims: dict[str, DimRange], *,
                 timing_cache: Path | None = None, workspace_mb: int = 4096,
                 echo: Callable[[str], None] = print) -> dict[str, list[int]]:
    """Build ``out_path`` (a serialized engine) from ``onnx_path``; return the profile that was used."""

    require_tensorrt()  # the real library and a GPU, or a one-line error naming the [trt] extra
    import tensorrt as trt  # typed by tensorrt-stubs under mypy

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise Blip2Error(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    shapes = profile_shapes(record.io, dims)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise Blip2Error(f"{onnx_path.name} has input {name!r} that the manifest does not declare")
        lo, opt, hi = shapes[name]
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    config.progress_monitor = _progress_monitor(echo, record.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Blip2Error(f"TensorRT failed to build an engine for {record.name} (see the log above)",
                         hint="try a smaller --max-batch/--max-context or a larger --workspace")
    atomic_write_bytes(out_path, bytes(serialized))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    used = {d: [r.min, r.opt, r.max] for d, r in dims.items()
            if any(d in s.dims for s in record.io.inputs)}
    return used


def build_engines(bundle: Path, stage: Path, graphs: dict[str, GraphRecord], dims: dict[str, DimRange],
                  *, timing_cache: Path | None = None, workspace_mb: int, progress: bool = True,
                  echo: Callable[[str], None] | None = None,
                  taken: AbstractSet[str] = frozenset()) -> dict[str, GraphRecord]:
    """Build one engine per graph into ``stage``; return the records with their new :class:`EngineRecord`.

    The ONNX is read from ``stage`` when this build just wrote it, else from the bundle. Engines for
    other devices stay recorded beside the new one (a bundle can carry engines for several GPUs).
    """

    say = echo or (lambda s: None)
    device = current_device()
    say(f"building TensorRT {device.backend_version} engines for {device.name} (sm {device.compute_capability})")
    out = {}
    for name, rec in graphs.items():
        src = stage / rec.file if (stage / rec.file).is_file() else bundle / rec.file
        # One plan per graph, precision and GPU architecture; never over a file the live manifest uses.
        arch = device.compute_capability.replace(".", "")
        plan = fresh_name(set(taken), f"{name}.{rec.precision}.sm{arch}", ".plan")
        profile = build_engine(src, stage / plan, rec, dims, timing_cache=timing_cache,
                               workspace_mb=workspace_mb, echo=say if progress else (lambda s: None))
        fr = file_record(stage, plan)
        engine = EngineRecord(file=plan, sha256=fr.sha256, backend="trt", device_name=device.name,
                              compute_capability=device.compute_capability,
                              backend_version=device.backend_version, profile=profile)
        others = tuple(e for e in rec.engines if e.compute_capability != device.compute_capability)
        out[name] = dataclasses.replace(rec, engines=(*others, engine))
        say(f"  {plan}: {fr.bytes / 1e6:.2f} MB")
    return out
