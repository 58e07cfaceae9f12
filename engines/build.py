"""``blip2-export build``: put a precision into a bundle's graphs, and optionally build TensorRT engines.

    build_bundle("bundle/", BuildConfig(precision="fp16"))                                 # ONNX Runtime
    build_bundle("bundle/", BuildConfig(precision="int8", calib_images=Path("imgs")))
    build_bundle("bundle/", BuildConfig(precision="fp16", backend="trt", timing_cache=Path("cache")))

Steps: validate the config against the manifest (before any long work) -> where the precision's transforms
need it (``runtime.precisions``), record calibration inputs by running the fp32 bundle -> transform each
fp32 graph with its role's transform (:data:`TRANSFORM_FUNCS`: ``engines.fp16`` / ``engines.int8`` /
``engines.int4``) into ``<graph>.<precision>.onnx`` -> for ``trt``, build ``<graph>.<precision>.plan`` from that ONNX ->
rewrite ``manifest.json``. New files are written in a hidden staging folder inside the bundle and
renamed into place just before the manifest is replaced (temp + rename), so an interrupted build
leaves the bundle as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engines.calibration import CalibrationSet, LlmSide, collect, list_calibration_images, read_prompts
from engines.engine_builders import ENGINE_BUILDERS, EngineJob, auto_builder
from engines.fp16 import FP32_GRAPHS, convert_fp16
from engines.int4 import BLOCK_SIZES, LM_HEAD, quantize_int4
from engines.int8 import LLM_GRAPHS, CalibMethod, Recipe, quantize_static_graph, quantize_weights
from engines.onnx_utils import EXTERNAL_DATA_THRESHOLD, fresh_name
from engines.ort_optimize import INT8_MODES
from engines.tensor_store import DataWriter, load_lazy, new_writer, save_streaming, weight_bytes
from runtime.bundle_files import BundleFiles
from runtime.contract import Family, GraphName
from runtime.errors import Blip2Error, BundleError
from runtime.graph_check import check_bundle_graphs
from runtime.integrity import atomic_write_text
from runtime.manifest import (
    MANIFEST_NAME,
    DimRange,
    FileRecord,
    GraphRecord,
    Manifest,
    file_record,
    iter_files,
    load_manifest,
)
from runtime.precisions import PRECISIONS as SPECS
from runtime.precisions import Transform

BACKENDS = ("auto", *ENGINE_BUILDERS)
IO_DTYPE = {p.name: p.io_dtype for p in SPECS.values()}
# What each backend builds (the registry's engine recipes). fp32 needs no transform: ``build --precision
# fp32`` only makes sense for engines.
BACKEND_PRECISIONS = {b: tuple(p.name for p in SPECS.values() if b in p.backends()) for b in ENGINE_BUILDERS}
KV_CACHE_DTYPES = ("int8", "fp32")  # --ort-kv-cache (int8 builds): how the ORT decoder engine stores its cache


@dataclass(frozen=True)
class BuildConfig:
    """What ``blip2-export build`` does. :meth:`validate` runs before any long work."""

    precision: str
    backend: str = "auto"  # auto: trt where TensorRT and a GPU exist, else ort
    max_batch: int | None = None  # engine profile max; default the manifest's
    max_context: int | None = None  # engine profile max for seq/past/total; default the manifest's
    timing_cache: Path | None = None  # TensorRT timing cache file, read and updated across builds
    workspace_mb: int = 4096
    calib_images: Path | None = None
    calib_prompts: Path | None = None
    calib_method: str = "percentile"
    calib_percentile: float = 99.99
    calib_limit: int = 64  # images used at most
    # calibrated graphs: keep blocks float, last first, until the output error on the calibration
    # feeds is at most this (relative L2); 0 quantizes every linear layer
    int8_tolerance: float = 0.05
    llm_int8: str = "weight"  # LLM graphs: weight-only int8 ("weight") or calibrated Q/DQ ("static")
    ort_int8: str = "nbits"  # ORT decoder engine of int8 weights: MatMulNBits ("nbits") or fp32 copies ("fold")
    ort_kv_cache: str = "int8"  # ORT int8 decoder engine's KV cache: "int8" (calibrated scales) or "fp32"
    force: bool = False  # redo the ONNX transform even when the bundle already has this precision
    int4_block: int = 128  # int4: inputs per weight block (one scale each)
    int4_method: str = "gptq"  # int4: "gptq" (error feedback from calibration) or "rtn" (plain rounding)
    int4_lm_head: str = "int4"  # int4: the LM head as "int4", "int8" (per channel) or "fp32"
    int4_vision: str = "int8"  # int4: vision / Q-Former (and retrieval heads) as "int8" (calibrated) or "fp16"

    def resolved_backend(self) -> str:
        return auto_builder() if self.backend == "auto" else self.backend

    def validate(self, manifest: Manifest | None = None) -> None:

        if self.precision not in SPECS:
            raise Blip2Error(f"--precision {self.precision!r} is not one of {', '.join(SPECS)}")
        if self.backend not in BACKENDS:
            raise Blip2Error(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        backend = self.resolved_backend()
        if self.precision not in BACKEND_PRECISIONS[backend]:
            if self.precision == "fp32":
                raise Blip2Error("--precision fp32 has nothing to build for ONNX Runtime: the exported graphs "
                                 "are fp32 already",
                                 hint=f"use --precision {' or '.join(BACKEND_PRECISIONS['ort'])}, or --backend trt "
                                      "for fp32 TensorRT engines")
            raise Blip2Error(f"backend {backend} cannot run --precision {self.precision}",
                             hint=f"{backend} builds {', '.join(BACKEND_PRECISIONS[backend])}")
        ENGINE_BUILDERS[backend].require()  # e.g. TensorRT: names the [trt] extra, or says there is no GPU
        if self.max_batch is not None and self.max_batch < 1:
            raise Blip2Error(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.workspace_mb < 64:
            raise Blip2Error(f"--workspace must be at least 64 MB (got {self.workspace_mb})")
        if self.calib_method not in {m.value for m in CalibMethod}:
            raise Blip2Error(f"--calib-method {self.calib_method!r} is not one of "
                             f"{', '.join(m.value for m in CalibMethod)}")
        if not 90.0 <= self.calib_percentile < 100.0:
            raise Blip2Error(f"--calib-percentile must be in [90, 100) (got {self.calib_percentile})")
        if not 0.0 <= self.int8_tolerance < 1.0:
            raise Blip2Error(f"--int8-tolerance must be in [0, 1) (got {self.int8_tolerance})",
                             hint="e.g. 0.05 (5% output error); 0 quantizes every linear layer")

        if self.ort_int8 not in INT8_MODES:
            raise Blip2Error(f"--ort-int8 {self.ort_int8!r} is not one of {', '.join(INT8_MODES)}")
        if self.ort_kv_cache not in KV_CACHE_DTYPES:
            raise Blip2Error(f"--ort-kv-cache {self.ort_kv_cache!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.llm_int8 not in {r.value for r in Recipe}:
            raise Blip2Error(f"--llm-int8 {self.llm_int8!r} is not one of {', '.join(r.value for r in Recipe)}")
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise Blip2Error(f"--timing-cache must be a file path, not a folder: {self.timing_cache}")

        if self.int4_block not in BLOCK_SIZES:
            raise Blip2Error(f"--int4-block {self.int4_block} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.int4_lm_head not in LM_HEAD:
            raise Blip2Error(f"--int4-lm-head {self.int4_lm_head!r} is not one of {', '.join(LM_HEAD)}")
        plan = self.plan(manifest)  # every role's transform: a bad choice flag fails here
        calibrated = [g for g, t in plan.items() if t.calibrated]
        if self.needs_transform(manifest) and calibrated:
            if self.calib_images is None:
                raise Blip2Error(f"{self.precision} needs calibration images (for {', '.join(calibrated)})",
                                 hint="pass --calib-images DIR (a few dozen images like the ones the model will see)")

            list_calibration_images(self.calib_images)
            prompts = read_prompts(self.calib_prompts)
            if manifest is not None and manifest.family is Family.RETRIEVAL:
                if self.calib_prompts is None:
                    raise Blip2Error(
                        f"{self.precision} for a retrieval bundle needs captions to calibrate its text encoder",
                        hint="pass --calib-prompts FILE: a few dozen captions like the ones you will rank, one per "
                             "line. The built-in captioning prompts set its int8 ranges far too narrow (R@1 0.06 "
                             "instead of 0.97 on the trainer's test set)")
                if not any(p.strip() for p in prompts):
                    raise Blip2Error(f"--calib-prompts {self.calib_prompts} has no captions (only empty lines)")
        if manifest is not None:
            if self.max_batch is not None and self.max_batch > manifest.dims["batch"].max:
                raise Blip2Error(f"--max-batch {self.max_batch} exceeds the bundle's batch limit "
                                 f"{manifest.dims['batch'].max}", hint="re-export with a larger --max-batch")
            ctx = manifest.model.max_context
            if self.max_context is not None and not manifest.model.num_query_tokens < self.max_context <= ctx:
                raise Blip2Error(f"--max-context {self.max_context} must be in ({manifest.model.num_query_tokens}, "
                                 f"{ctx}] for this bundle", hint="re-export with a larger --max-context")
            if self.precision in manifest.graphs and self.precision != "fp32" and not self.force \
                    and backend == "ort":
                raise Blip2Error(f"the bundle already has {self.precision} graphs",
                                 hint="pass --force to rebuild them, or --backend trt to build engines from them")

    def plan(self, manifest: Manifest | None = None) -> dict[str, Transform]:
        """Graph name -> the transform it gets (the registry's default per role, or the one a flag picks).
        Without a manifest: one representative graph per role."""
        spec = SPECS[self.precision]
        names = list(manifest.graphs["fp32"]) if manifest is not None else [
            GraphName.VISION.value, GraphName.QFORMER.value, GraphName.DECODER.value]
        return {n: spec.transform_for(n, self) for n in names}

    def needs_transform(self, manifest: Manifest | None) -> bool:
        if self.precision == "fp32":
            return False
        return manifest is None or self.precision not in manifest.graphs or self.force

    def engine_dims(self, manifest: Manifest) -> dict[str, DimRange]:
        """The manifest's dim ranges, narrowed by --max-batch / --max-context (engine profiles)."""
        caps = {"batch": self.max_batch, "seq": self.max_context, "total": self.max_context,
                "past": None if self.max_context is None else self.max_context - 1,
                "enc_seq": self.max_context}
        out = {}
        for name, r in manifest.dims.items():
            cap = caps.get(name)
            hi = r.max if cap is None else min(cap, r.max)
            out[name] = DimRange(r.min, min(max(r.opt, r.min), hi), hi)
        return out


@dataclass
class GraphSize:
    precision: str
    graph: str
    file: str
    bytes: int
    fp32_bytes: int

    @property
    def ratio(self) -> float:
        return self.bytes / self.fp32_bytes if self.fp32_bytes else float("nan")


@dataclass
class BuildReport:
    bundle: Path
    precision: str
    backend: str
    transformed: bool
    sizes: list[GraphSize] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    fallbacks: dict[str, dict] = field(default_factory=dict)  # graph -> notes["float_fallback"]

    def render(self) -> str:
        lines = [f"built {self.precision} for {self.backend} in {self.bundle}"
                 + ("" if self.transformed else f" (reused the bundle's {self.precision} graphs)"),
                 f"  {'graph':<16} {'file':<26} {'MB':>9} {'fp32 MB':>9} {'ratio':>6}"]
        for s in self.sizes:
            lines.append(f"  {s.graph:<16} {s.file:<26} {s.bytes / 1e6:9.2f} {s.fp32_bytes / 1e6:9.2f} {s.ratio:6.2f}")
        total = sum(s.bytes for s in self.sizes)
        total32 = sum(s.fp32_bytes for s in self.sizes)
        if total32:
            lines.append(f"  {'all graphs':<16} {'':<26} {total / 1e6:9.2f} {total32 / 1e6:9.2f} "
                         f"{total / total32:6.2f}")
        for e in self.engines:
            lines.append(f"  engine {e}")
        for g, fb in self.fallbacks.items():
            kept = len(fb["float_blocks"])
            what = (f"{kept} of {fb['blocks']} blocks kept float ({', '.join(fb['float_blocks'])})" if kept
                    else "every block int8")
            lines.append(f"  {g}: {what}; output error {fb['error_all_int8']:.4f} all int8 -> {fb['error']:.4f}, "
                         f"tolerance {fb['tolerance']}" + ("" if fb["met"] else
                                                          " NOT MET (at most half the blocks go float): check "
                                                          "with 'blip2-export parity'"))
        return "\n".join(lines)


def graph_bytes(bundle: Path, rec: GraphRecord) -> int:
    return (bundle / rec.file).stat().st_size + sum(e.bytes for e in rec.external_data)


def io_for(manifest: Manifest, name: str, precision: str):
    """The contract's IO for ``name`` at ``precision`` (float IO dtype per :data:`IO_DTYPE`)."""
    return manifest.expected_io(name, IO_DTYPE[precision])


def build_bundle(bundle: str | Path, config: BuildConfig, *, progress: bool = True,
                 echo: Callable[[str], None] | None = None) -> BuildReport:
    bundle = Path(bundle)
    say = echo or (lambda s: None)
    manifest = load_manifest(bundle, verify=False)
    if "fp32" not in manifest.graphs:
        raise Blip2Error(f"{bundle} is a deployment bundle ({', '.join(manifest.precisions())} only, made by "
                         "'blip2-export slim'): it has no fp32 graphs to build from",
                         hint="build in the full bundle, then slim it again")
    # What the build reads: the shared files and the fp32 graphs it transforms (or the graphs it makes
    # engines of); other precisions' files are not read (a full-size bundle holds tens of GB).
    BundleFiles(bundle).verify_all(iter_files(manifest, {"fp32", config.precision}))

    check_bundle_graphs(bundle, manifest)  # before onnx.load follows any external-data path in a transform
    config.validate(manifest)
    backend = config.resolved_backend()
    prec = config.precision
    transformed = config.needs_transform(manifest)
    stage = Path(tempfile.mkdtemp(prefix=f".build-{prec}.", suffix=".tmp", dir=bundle))
    try:
        graphs = dict(manifest.graphs.get(prec, {}))
        calib = None
        if transformed:
            graphs, calib = _transform(bundle, stage, manifest, config, progress, say, _files_of_all(manifest))
        job = EngineJob(bundle, stage, manifest, config, transformed, calib, config.engine_dims(manifest),
                        _files_of_all(manifest), progress, say)
        graphs = ENGINE_BUILDERS[backend].build(job, graphs)  # ORT engine graphs, or TensorRT engines
        table = _precision_table(bundle, stage, manifest, prec, say) if transformed else None
        new_files = [f.name for f in stage.iterdir()]
        engine_names = sorted({e.file for g in graphs.values() for e in g.engines
                               if e.backend == backend and e.file in new_files})  # made by this build
        # Commit: move the new files in (under names the live manifest does not use, so nothing it
        # vouches for is overwritten), then replace the manifest: the only file that makes them count.
        old_files = _files_of(manifest.graphs.get(prec, {}))
        role = f"embed_tokens.{prec}"
        files = {k: v for k, v in manifest.files.items() if k != role}
        if role in manifest.files:
            old_files.add(manifest.files[role].file)  # this precision's previous table
        if table is not None:
            files[role] = table
        for f in stage.iterdir():
            os.replace(f, bundle / f.name)
        new_graphs = {**manifest.graphs, prec: graphs}
        updated = dataclasses.replace(manifest, graphs=new_graphs, files=files)
        updated.validate()
        atomic_write_text(bundle / MANIFEST_NAME, updated.dumps())
        remove_stale_files(bundle, old_files - _files_of_all(updated) - set(new_files) - _role_files(updated))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    final = load_manifest(bundle, verify=False)
    BundleFiles(bundle).verify_all(iter_files(final, {prec}))  # what this build wrote, read back
    report = BuildReport(bundle, prec, backend, transformed, engines=engine_names)
    for name, rec in final.graphs[prec].items():
        fp32 = final.graphs["fp32"].get(name)
        report.sizes.append(GraphSize(prec, name, rec.file, graph_bytes(bundle, rec),
                                      graph_bytes(bundle, fp32) if fp32 else 0))
        if transformed and "float_fallback" in rec.notes:
            report.fallbacks[name] = rec.notes["float_fallback"]
    return report


def remove_stale_files(bundle: Path, names: set[str]) -> None:
    """Delete the old files of the rebuilt precision that the new manifest no longer lists.

    Only plain names of regular files directly in the bundle's real folder (``BundleFiles.resolve``: no
    symlinked file or folder, nothing outside), unlinked relative to that folder's descriptor, so a name
    can never reach a file elsewhere even if the folder changes meanwhile."""

    files = BundleFiles(bundle, verify=False)
    fd = os.open(files.real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for name in sorted(names):
            try:
                files.resolve(name)  # re-checked right before the unlink
            except BundleError:
                continue
            try:
                os.unlink(name, dir_fd=fd) if os.unlink in os.supports_dir_fd else os.unlink(files.resolve(name))
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


def _precision_table(bundle: Path, stage: Path, manifest: Manifest, prec: str, say) -> FileRecord | None:
    """The precision's own input embedding table (``PrecisionSpec.table_dtype``, e.g. float16 for int4),
    written into ``stage`` from the shared float32 one; None where the precision reads the shared one."""
    import numpy as np

    from runtime.text import load_table

    dtype = SPECS[prec].table_dtype
    if dtype is None or "embed_tokens" not in manifest.files:
        return None
    table = load_table(BundleFiles(bundle), manifest, "embed_tokens")  # read once, checked
    assert table is not None
    small = table.astype(dtype)
    if not np.isfinite(small).all():
        say(f"{prec}: the embedding table does not fit {dtype}; it reads the shared float32 table")
        return None
    name = fresh_name({r.file for r in manifest.files.values()}, f"embed_tokens.{prec}", ".npy")
    np.save(stage / name, small, allow_pickle=False)
    del table, small
    return file_record(stage, name)


def _role_files(manifest: Manifest) -> set[str]:
    return {r.file for r in manifest.files.values()} | {"manifest.json"}


def _files_of_all(manifest: Manifest) -> set[str]:
    return set().union(*(_files_of(g) for g in manifest.graphs.values()))


def _files_of(graphs: dict[str, GraphRecord]) -> set[str]:
    out = set()
    for g in graphs.values():
        out.add(g.file)
        out.update(e.file for e in g.external_data)
        out.update(e.file for e in g.engines)
    return out


@dataclass(frozen=True)
class TransformJob:
    """One graph to transform: what a :data:`TRANSFORM_FUNCS` entry gets."""

    src: Path  # the fp32 graph file
    name: str
    io: object  # GraphIO at the precision's IO dtype
    manifest: Manifest
    config: BuildConfig
    calib: CalibrationSet | None
    dst: Path | None = None  # where the graph will be written
    spilled: list = field(default_factory=list)  # the DataWriter of ``dst``, once a transform asked for it

    def writer(self, shrink: int) -> DataWriter | None:
        """The data file of ``dst``, for a transform that writes its large tensors as it makes them (so
        they are never all in memory), when its weights (the fp32 ones over ``shrink``) will not fit
        inline anyway; None otherwise (small graphs keep their weights inline, as before)."""
        if self.dst is None or weight_bytes(load_lazy(self.src)) <= shrink * EXTERNAL_DATA_THRESHOLD:
            return None
        if not self.spilled:
            self.spilled.append(new_writer(self.dst))
        return self.spilled[0]


def _fp16(job: TransformJob) -> tuple[object, dict]:

    r16 = convert_fp16(job.src, job.name, job.io, job.manifest.model.llm_type,  # type: ignore[arg-type]
                       writer=job.writer(shrink=2))
    return r16.model, r16.notes(job.name in FP32_GRAPHS)


def _int8_weight(job: TransformJob) -> tuple[object, dict]:

    r8 = quantize_weights(job.src, job.name, job.io)  # type: ignore[arg-type]
    return r8.model, r8.notes


def _int8_static(job: TransformJob) -> tuple[object, dict]:

    assert job.calib is not None
    if job.calib.count(job.name) == 0:
        raise BundleError(f"calibration recorded no inputs for graph {job.name!r}")
    r8 = quantize_static_graph(job.src, job.name, job.io, job.calib.feeds.get(job.name, []),  # type: ignore[arg-type]
                               CalibMethod(job.config.calib_method), job.config.calib_percentile, progress=False,
                               tolerance=job.config.int8_tolerance)
    return r8.model, r8.notes


def _int4(method: str) -> Callable[[TransformJob], tuple[object, dict]]:
    def run(job: TransformJob) -> tuple[object, dict]:

        feeds = job.calib.feeds.get(job.name, []) if job.calib is not None else None
        stats = job.calib.ran.get(job.name) if job.calib is not None else None  # what the calibration ran
        r4 = quantize_int4(job.src, job.name, job.io, block=job.config.int4_block, method=method,  # type: ignore[arg-type]
                           lm_head=job.config.int4_lm_head, feeds=feeds, stats_graph=stats,
                           writer=job.writer(shrink=8))
        return r4.model, r4.notes

    return run


# runtime.precisions.TRANSFORMS name -> the function that performs it (the one place engines code meets
# the registry's transform names).
TRANSFORM_FUNCS: dict[str, Callable[[TransformJob], tuple[object, dict]]] = {
    "fp16": _fp16,
    "int8-weight": _int8_weight,
    "int8-static": _int8_static,
    "int4-gptq": _int4("gptq"),
    "int4-rtn": _int4("rtn"),
}


def _transform(bundle: Path, stage: Path, manifest: Manifest, config: BuildConfig, progress: bool,
               say: Callable[[str], None], taken: set[str]
               ) -> tuple[dict[str, GraphRecord], CalibrationSet | None]:
    """Write the ``config.precision`` graphs into ``stage``; return their records and the calibration
    set (when a transform needed one; None otherwise)."""

    prec = config.precision
    names = list(manifest.graphs["fp32"])
    plan = config.plan(manifest)
    out: dict[str, GraphRecord] = {}

    def run(todo: list[str]) -> None:
        it = todo
        if progress and todo:
            from tqdm import tqdm

            it = tqdm(todo, desc=f"{prec} graphs", unit="graph")
        for name in it:
            src = manifest.graphs["fp32"][name]
            io = io_for(manifest, name, prec)
            t = plan[name]
            file = fresh_name(taken, f"{name}.{prec}", ".onnx")
            job = TransformJob(bundle / src.file, name, io, manifest, config, calib, dst=stage / file)
            model, notes = TRANSFORM_FUNCS[t.name](job)
            out[name] = _write_graph(model, stage, file, writer=job.spilled[0] if job.spilled else None,
                                     name=name, io=io, precision=prec, notes=notes, transform=t.name)
            del model, job
            release_memory()

    # The graphs that need no calibration first: an int8 build's weight-only LLM is then what its
    # calibration runs (for the KV-cache scales), at a quarter of the fp32 LLM's memory (#13).
    calib = None
    run([n for n in names if not plan[n].calibrated])
    calibrated = [n for n in names if plan[n].calibrated]
    if calibrated:

        images = list_calibration_images(config.calib_images, config.calib_limit)  # type: ignore[arg-type]
        prompts = read_prompts(config.calib_prompts)
        helpers = _stats_graphs(bundle, stage, manifest, plan, taken)
        llm = _llm_side(names, plan, config, stage, {**out, **helpers})
        say(f"calibrating on {len(images)} images x {len(prompts)} prompts ({config.calib_method}) "
            f"for {', '.join(f'{n} ({plan[n].name})' for n in calibrated)}"
            + ("" if not llm.run or not llm.graphs else
               f"; the LLM runs as {', '.join(f'{n} {r.transform}' for n, (_, r) in llm.graphs.items())}"))
        calib = collect(bundle, images, prompts, progress=progress, llm=llm)
        release_memory()  # the runtime that calibrated is gone: its memory too, before the next step
        run(calibrated)
        for rec in helpers.values():  # made for the calibration only: not part of the build
            for f in (rec.file, *(e.file for e in rec.external_data)):
                (stage / f).unlink(missing_ok=True)
    return {n: out[n] for n in names}, calib


def _stats_graphs(bundle: Path, stage: Path, manifest: Manifest, plan: dict[str, Transform],
                  taken: set[str]) -> dict[str, GraphRecord]:
    """For the LLM graphs whose weight-only transform is fitted to calibration statistics (int4 GPTQ),
    their weight-only int8 builds, written into ``stage`` under hidden names: the calibration runs them
    (and GPTQ takes its layer inputs from them) instead of the fp32 graphs, at a quarter of the fp32
    weights' memory (#13). Removed by the caller once the transforms are done."""
    out: dict[str, GraphRecord] = {}
    for name, t in plan.items():
        if name not in LLM_GRAPHS or not (t.calibrated and t.ort_engine == "weights"):
            continue
        src = manifest.graphs["fp32"][name]
        io = io_for(manifest, name, "int8")
        r8 = quantize_weights(bundle / src.file, name, io)
        file = fresh_name(taken | {f.name for f in stage.iterdir()}, f".stats.{name}.int8", ".onnx")
        out[name] = _write_graph(r8.model, stage, file, name=name, io=io, precision="int8", transform="int8-weight")
        del r8
        release_memory()
    return out


def _write_graph(model, stage: Path, file: str, *, writer: DataWriter | None = None, **fields) -> GraphRecord:
    """Write ``model`` as ``stage/file`` (its weights streamed to ``file.data``; ``writer``: the data file a
    transform already wrote into) and return its record, checksums included; ``fields``: the record's
    name, io, precision, transform and notes."""
    ext = save_streaming(model, stage / file, external_threshold=EXTERNAL_DATA_THRESHOLD, writer=writer)
    rec = file_record(stage, file)
    return GraphRecord(file=file, sha256=rec.sha256, external_data=tuple(file_record(stage, e) for e in ext),
                       **fields)


def release_memory() -> None:
    """Hand memory the build has freed back to the system between steps: glibc keeps large freed blocks
    in its heap, so each step would start from the last one's high-water mark (measured: 0.25 of the
    0.56 GB held after a calibration were such blocks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _llm_side(names: list[str], plan: dict[str, Transform], config: BuildConfig, stage: Path,
              built: dict[str, GraphRecord]) -> LlmSide:
    """What the calibration runs on the LLM side: where an LLM graph is calibrated, the fp32 LLM, or (int4
    GPTQ) its weight-only int8 builds; else, where the ORT decoder engine will keep an int8 KV cache (it
    needs the cache's scales), the decoder this build has just made; else nothing."""
    llm = [n for n in names if n in LLM_GRAPHS]
    if any(plan[n].calibrated for n in llm):
        # weight-only transforms fitted to statistics (int4 GPTQ) calibrate on the weight-only int8 builds
        # :func:`_stats_graphs` made; calibrated activations (static int8) on the fp32 LLM
        if all(plan[n].ort_engine == "weights" and n in built for n in llm):
            return LlmSide(graphs={n: (stage, built[n]) for n in llm})
        return LlmSide()
    decoder = GraphName.DECODER.value
    if decoder in built and config.ort_kv_cache == "int8" and config.resolved_backend() == "ort":
        return LlmSide(graphs={decoder: (stage, built[decoder])})
    return LlmSide(run=False)
