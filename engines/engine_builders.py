"""Engine builders, one per backend that builds engines from a bundle's graphs (``blip2-export build
--backend``): ONNX Runtime (engine graphs made once: fused attention, in-place KV cache, int8/int4 kernels)
and TensorRT (serialized engines for this GPU).

A builder says whether it can build here (:meth:`EngineBuilder.unavailable`), and builds the engines of a
precision's graphs into the build's staging folder (:meth:`EngineBuilder.build`). :mod:`engines.build` runs
the registered builder the user chose; a new backend that builds engines registers one here (its runtime
side registers in :mod:`runtime.backends`).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engines.ort_optimize import attach_ort_engine, kv_cache_scales
from engines.trt_builder import build_engines  # imports tensorrt: only where it is installed
from runtime.backends.trt import require_tensorrt, tensorrt_status
from runtime.contract import GraphName
from runtime.manifest import DimRange, GraphRecord, Manifest
from runtime.registry import Registry


@dataclass
class EngineJob:
    """One build's engine work: the bundle, its staging folder, what was just transformed."""

    bundle: Path
    stage: Path
    manifest: Manifest
    config: Any  # engines.build.BuildConfig
    transformed: bool  # the precision's graphs were (re)written by this build
    calibration: Any  # engines.calibration.CalibrationSet of this build, or None
    dims: dict[str, DimRange]  # engine profile ranges (the config's caps over the manifest's)
    taken: AbstractSet[str]  # file names the live manifest uses (never overwritten)
    progress: bool = True
    say: Callable[[str], None] = lambda s: None


class EngineBuilder(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this builder cannot build on this machine (None: it can)."""

    def require(self) -> None:
        """Raise the error that says what to install, where :meth:`unavailable` is not None."""

    def build(self, job: EngineJob, graphs: dict[str, GraphRecord]) -> dict[str, GraphRecord]:
        """Build the engines of ``graphs`` into ``job.stage``; return the records listing them."""


class OrtEngineBuilder:
    """ORT engine graphs of newly transformed graphs (those of the fp32 export are made at export)."""

    name = "ort"

    def unavailable(self) -> str | None:
        return None

    def require(self) -> None:
        return None

    def build(self, job: EngineJob, graphs: dict[str, GraphRecord]) -> dict[str, GraphRecord]:
        if not job.transformed:
            return graphs
        kv_scales = None
        decoder = GraphName.DECODER.value
        if job.calibration is not None and job.config.ort_kv_cache == "int8" and decoder in graphs:
            kv_scales = kv_cache_scales(job.calibration.kv_peak, job.manifest.model.llm_layers)
        return {name: attach_ort_engine(job.stage, rec, job.manifest.model, warn=job.say, int8=job.config.ort_int8,
                                        kv_scales=kv_scales if name == decoder else None)
                for name, rec in graphs.items()}


class TrtEngineBuilder:
    """Strongly typed TensorRT engines of the precision's graphs, for this GPU (:mod:`engines.trt_builder`)."""

    name = "trt"

    def unavailable(self) -> str | None:
        return tensorrt_status()

    def require(self) -> None:
        require_tensorrt()  # names the [trt] extra, or says there is no GPU

    def build(self, job: EngineJob, graphs: dict[str, GraphRecord]) -> dict[str, GraphRecord]:

        return build_engines(job.bundle, job.stage, graphs, job.dims, timing_cache=job.config.timing_cache,
                             workspace_mb=job.config.workspace_mb, progress=job.progress, echo=job.say,
                             taken=job.taken)


ENGINE_BUILDERS: Registry[str, EngineBuilder] = Registry("engine builder", lambda b: b.name)


def register_engine_builder(builder: EngineBuilder) -> EngineBuilder:
    return ENGINE_BUILDERS.register(builder)


def auto_builder() -> str:
    """``--backend auto``: the first registered builder that can build here, TensorRT before ONNX Runtime."""
    for name in ("trt", *ENGINE_BUILDERS):
        if name in ENGINE_BUILDERS and ENGINE_BUILDERS[name].unavailable() is None:
            return name
    return "ort"


register_engine_builder(OrtEngineBuilder())
register_engine_builder(TrtEngineBuilder())
