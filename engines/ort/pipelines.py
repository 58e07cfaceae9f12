"""The ORT engine builds: which passes each engine kind runs, in order, streaming weights to the engine's
data file; which graphs get which engine; attaching engines to a bundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.int4 import NBITS_ACCURACY_LEVEL as INT4_ACCURACY_LEVEL
from engines.onnx_utils import EXTERNAL_DATA_THRESHOLD
from engines.ort.activations import uint8_activations
from engines.ort.attention import fuse_decoder_attention
from engines.ort.graph import PatternError
from engines.ort.kv_cache import KV_INT8_MARGIN, quantize_kv_cache
from engines.ort.logits import last_position_logits
from engines.ort.reshapes import drop_row_reshapes
from engines.ort.weights import INT8_MODES, fold_int8_weights, pack_qkv
from engines.tensor_store import (
    external_info,
    is_external,
    load_lazy,
    new_writer,
    save_streaming,
    weight_bytes,
)
from runtime.backends.nbits import NBITS_ACCURACY_LEVEL, NBITS_BLOCK, quantized_layers
from runtime.contract import GraphName
from runtime.errors import Blip2Error, require
from runtime.integrity import atomic_write_text
from runtime.manifest import MANIFEST_NAME, EngineRecord, file_record, load_manifest


@dataclass
class EngineContext:
    """What the passes of one engine build see: the graph being rewritten (weights not loaded), where new
    weights go, and the build's options."""

    model: Any  # onnx.ModelProto, read without its external data
    writer: Any  # engines.tensor_store.DataWriter, or None (small graphs hold their weights)
    src: Path
    int8: str = "nbits"  # weight-only int8 layers: MatMulNBits ("nbits") or folded to fp32 ("fold")
    layers: int = 0  # decoders: layers, query heads, key/value heads, head size
    heads: int = 0
    kv_heads: int | None = None
    head_dim: int = 0
    kv_scales: dict[str, np.ndarray] | None = None  # decoders: keep the KV cache in int8 with these scales


@dataclass(frozen=True)
class EnginePass:
    """One rewrite of an engine build; ``run`` changes ``ctx.model`` and returns manifest notes."""

    name: str
    run: Callable[[EngineContext], dict]


def _attention(ctx: EngineContext) -> dict:
    r = fuse_decoder_attention(ctx.model, layers=ctx.layers, heads=ctx.heads, head_dim=ctx.head_dim,
                               kv_heads=ctx.kv_heads)
    return dict(r.notes, nodes_before=r.nodes_before)


def _last_logits(ctx: EngineContext) -> dict:
    return {"logits": "last" if last_position_logits(ctx.model) else "all"}


def _weights(ctx: EngineContext) -> dict:
    return _engine_int8_weights(ctx.model, ctx.int8, ctx.writer)


def _weights_required(ctx: EngineContext) -> dict:
    notes = _weights(ctx)
    if not notes:
        raise PatternError(f"{ctx.src.name} has no int8 or int4 weights to lower or fold")
    return notes


def _row_reshapes(ctx: EngineContext) -> dict:
    return {"row_reshapes_dropped": drop_row_reshapes(ctx.model)}


def _qkv(ctx: EngineContext) -> dict:
    return {"qkv_packed": pack_qkv(ctx.model, ctx.writer)}


def _kv_int8(ctx: EngineContext) -> dict:
    if ctx.kv_scales is None:
        return {}
    return {"kv_dtype": "int8", "kv_quant": {"scales": "per channel, static (calibration)", "margin": KV_INT8_MARGIN,
                                             "layers": quantize_kv_cache(ctx.model, ctx.kv_scales)}}


def _uint8_pairs(ctx: EngineContext) -> dict:
    pairs = uint8_activations(ctx.model)
    if not pairs:
        raise PatternError(f"{ctx.src.name} has no symmetric int8 activation QuantizeLinear to rewrite")
    return {"activations": "uint8, zero point 128 (the graph's symmetric int8 values, shifted)",
            "activation_pairs": pairs}


# Which passes each engine kind runs, in order (see :func:`wants_engine` for which graph gets which kind).
PIPELINES: dict[str, tuple[EnginePass, ...]] = {
    # decoders: fused attention + in-place cache, LM head on the newest position, int8/int4 weight kernels,
    # MLP reshapes dropped, q|k|v in one matmul, an int8 cache where calibration gave scales
    "decoder": (EnginePass("attention", _attention), EnginePass("last_logits", _last_logits),
                EnginePass("weights", _weights), EnginePass("row_reshapes", _row_reshapes),
                EnginePass("qkv", _qkv), EnginePass("kv_int8", _kv_int8)),
    # weight-only graphs that keep their IO (the T5 encoder, cross K/V, decoder)
    "weights": (EnginePass("weights", _weights_required),),
    # calibrated Q/DQ int8 graphs (vision, Q-Former, retrieval heads)
    "qdq": (EnginePass("uint8_activations", _uint8_pairs),),
}


def build_engine(kind: str, src: str | Path, dst: str | Path, **options) -> tuple[list[str], dict]:
    """Run :data:`PIPELINES` ``[kind]`` over the graph at ``src`` and write the engine graph at ``dst``.

    Weights stream (:mod:`engines.tensor_store`): the graph is read without them, new weights go to the
    engine's data file as they are made, and weights the engine keeps unchanged stay in ``src``'s data
    file when it lies beside ``dst`` (stored once). Returns (external data files the engine refers to,
    notes for the manifest). Written through a temporary name, so ``dst`` is never half-written. A pass
    that finds nothing it can rewrite raises :class:`PatternError`."""
    if kind not in PIPELINES:
        raise Blip2Error(f"unknown ORT engine kind {kind!r}; known: {', '.join(PIPELINES)}")
    _check_int8_mode(options.get("int8", "nbits"))
    notes: dict[str, Any] = {}
    with _StreamedEngine(src, dst) as e:
        ctx = EngineContext(e.model, e.writer, Path(src), **options)
        for p in PIPELINES[kind]:
            notes.update(p.run(ctx))
        if "nodes_before" in notes:
            notes["nodes_after"] = len(e.model.graph.node)
        ext = e.save()
    return ext, notes


def build_decoder_engine(src: str | Path, dst: str | Path, *, layers: int, heads: int, head_dim: int,
                         kv_heads: int | None = None,
                         int8: str = "nbits", kv_scales: dict[str, np.ndarray] | None = None
                         ) -> tuple[list[str], dict]:
    """The decoder's ORT engine (:data:`PIPELINES` ``["decoder"]``): fused attention, in-place KV cache.

    With ``kv_scales`` (:func:`kv_cache_scales`) the engine keeps its KV cache in int8
    (:func:`quantize_kv_cache`; ``notes["kv_dtype"]`` says so), else in the graph's float type."""
    return build_engine("decoder", src, dst, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        int8=int8, kv_scales=kv_scales)


class _StreamedEngine:
    """A graph read without its weights (``src``) on its way to an engine file (``dst``)."""

    def __init__(self, src: str | Path, dst: str | Path):

        self.dst = Path(dst)
        self.model = load_lazy(src)
        here = self.dst.parent.resolve()
        self.share = tuple(sorted({external_info(t)["location"] for t in self.model.graph.initializer
                                   if is_external(t) and Path(external_info(t)["location"]).parent == here}))
        self.threshold = EXTERNAL_DATA_THRESHOLD
        # external when large, or when the source graph's weights are external (then shared, not copied)
        self.writer = new_writer(self.dst) if self.share or weight_bytes(self.model) > self.threshold else None

    def save(self) -> list[str]:

        return save_streaming(self.model, self.dst, external_threshold=self.threshold, share=self.share,
                              writer=self.writer)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.writer.path.exists():
                self.writer.path.unlink()


def _check_int8_mode(int8: str) -> None:
    if int8 not in INT8_MODES:
        raise Blip2Error(f"unknown int8 engine mode {int8!r}; choose one of: {', '.join(INT8_MODES)}")


def _engine_int8_weights(model, int8: str, writer=None) -> dict:
    """Say how the weight-only int8 and int4 layers of ``model`` run, and fold them (``int8="fold"``);
    return the manifest notes (empty when the graph has no int8 or int4 weights). ``writer``: where new
    weights go as they are made.

    The layers keep the portable graph's weights, so the bundle stores them once: the runtime lowers the
    int4 blocks and (``"nbits"``) the int8 layers to MatMulNBits (4 and 8 bits) while it stages the graph
    for loading (:func:`runtime.backends.nbits.lower_layers`, ``notes["lower_at_load"]``)."""

    counts = quantized_layers(model)
    fused4, lowered = counts[4], (counts[8] if int8 == "nbits" else 0)
    folded = fold_int8_weights(model, writer) if int8 == "fold" else 0
    notes: dict[str, Any] = {}
    if fused4:
        notes["int4_matmul"] = {"op": "com.microsoft.MatMulNBits", "bits": 4, "layers": fused4,
                                "accuracy_level": INT4_ACCURACY_LEVEL,
                                "made": "by the runtime at load, from the portable weights",
                                "activations": "int8 per weight block, quantized at run time"}
    if lowered:
        notes["int8_matmul"] = {"op": "com.microsoft.MatMulNBits", "bits": 8,
                                "accuracy_level": NBITS_ACCURACY_LEVEL, "block_size": NBITS_BLOCK,
                                "layers": lowered, "made": "by the runtime at load, from the portable weights",
                                "activations": f"int8 per block of {NBITS_BLOCK} inputs, quantized at run time"}

    if folded:
        notes["int8_weights_folded"] = folded  # DequantizeLinear computed once: fp32 weights, same values
    if fused4 or lowered:
        notes["lower_at_load"] = True
    return notes


def build_qdq_engine(src: str | Path, dst: str | Path) -> tuple[list[str], dict]:
    """ORT build of a calibrated (static Q/DQ) int8 graph: its activation pairs in uint8 (see
    :func:`uint8_activations`), everything else as in the portable graph. Raises :class:`PatternError`
    when the graph has no int8 activation pair to rewrite. Returns (external data files, notes)."""
    return build_engine("qdq", src, dst)


def build_weights_engine(src: str | Path, dst: str | Path, *, int8: str = "nbits") -> tuple[list[str], dict]:
    """ORT build of a weight-only int8 graph that keeps its IO (the T5 encoder, cross-attention K/V and
    decoder): its int8 layers as ``MatMulNBits`` (``int8="nbits"``) or dequantized once (``"fold"``), so
    no step rebuilds fp32 weights. Raises :class:`PatternError` when there is nothing to rewrite."""
    return build_engine("weights", src, dst, int8=int8)


WEIGHT_ONLY_GRAPHS = (GraphName.ENCODER.value, GraphName.CROSS_KV.value, GraphName.SEQ2SEQ_DECODER.value)


def wants_engine(record) -> str | None:
    """Which ORT engine build a graph record gets: "decoder", "qdq", "weights" or None.

    Read from the record's graph and its typed transform (``GraphRecord.transform`` ->
    ``runtime.precisions.TRANSFORMS``), not from free-form notes."""
    if record.name == GraphName.DECODER.value:
        return "decoder"
    kind = record.transform_spec.ort_engine
    if kind == "weights" and record.name not in WEIGHT_ONLY_GRAPHS:
        return None
    return kind


def engine_record_fields() -> dict:
    """The backend/device fields of a manifest ``EngineRecord`` for an ORT CPU build."""
    ort = require("onnxruntime", "cpu")
    return {"backend": "ort", "device_name": "cpu", "compute_capability": "", "backend_version": ort.__version__}


def attach_ort_engine(bundle_dir: str | Path, record, model_facts, *, warn=None, int8: str = "nbits",
                      kv_scales: dict[str, np.ndarray] | None = None):
    """Build the ORT engine of graph ``record`` inside ``bundle_dir``; return the record with it attached.

    Decoders get fused attention and the in-place KV cache (:func:`build_decoder_engine`); calibrated
    int8 graphs get uint8 activations (:func:`build_qdq_engine`); the T5 graphs' weight-only int8
    layers become MatMulNBits (:func:`build_weights_engine`); other graphs are returned unchanged.
    The engine is listed in ``record.engines`` (file + sha256, checked like every bundle file) and
    described in ``record.notes["ort_engine"]``, which tells the runtime how to feed it. When the graph
    does not match the rewrite, ``record`` is returned unchanged (the portable graph still runs) and
    ``warn`` (if given) receives the reason. ``kv_scales`` (decoders only): keep the KV cache in int8.
    """
    import dataclasses


    kind = wants_engine(record)
    if kind is None:
        return record
    bundle_dir = Path(bundle_dir)
    stem = record.file.removesuffix(".onnx")
    dst = f"{stem}.ort.onnx"
    m = model_facts
    options: dict[str, Any] = {"int8": int8} if kind != "qdq" else {}
    if kind == "decoder":
        options.update(layers=m.llm_layers, heads=m.query_heads, kv_heads=m.llm_heads, head_dim=m.head_dim,
                       kv_scales=kv_scales)
    try:
        ext, notes = build_engine(kind, bundle_dir / record.file, bundle_dir / dst, **options)
    except PatternError as e:
        if warn is not None:
            warn(f"no ORT engine for {record.file}: {e}")
        return record
    fields = engine_record_fields()
    engines = []
    own = {e.file for e in record.external_data}  # shared with the portable graph: listed there already
    for name in (dst, *(x for x in ext if x not in own)):
        fr = file_record(bundle_dir, name)
        engines.append(EngineRecord(file=name, sha256=fr.sha256, **fields))
    notes = dict(notes, file=dst, external_data=list(ext))
    return dataclasses.replace(record, engines=tuple(record.engines) + tuple(engines),
                               notes={**record.notes, "ort_engine": notes})


def add_ort_engines(bundle: str | Path, precisions: tuple[str, ...] | None = None, *, force: bool = False,
                    warn=None, int8: str = "nbits") -> list[str]:
    """Build the ORT engines an existing bundle's graphs lack (see :func:`attach_ort_engine`); rewrite
    its manifest.

    For bundles exported without engines, or built by an older version. Returns the precisions that
    gained an engine. The manifest is replaced atomically, last.
    """
    import dataclasses


    bundle = Path(bundle)
    m = load_manifest(bundle)
    graphs = {p: dict(gs) for p, gs in m.graphs.items()}
    done = []
    for prec, gs in graphs.items():
        if precisions is not None and prec not in precisions:
            continue
        for name, rec in list(gs.items()):
            if wants_engine(rec) is None:
                continue
            if "ort_engine" in rec.notes:
                if not force:
                    continue
                old = {rec.notes["ort_engine"].get("file"), *rec.notes["ort_engine"].get("external_data", [])}
                rec = dataclasses.replace(rec, engines=tuple(e for e in rec.engines if e.file not in old),
                                          notes={k: v for k, v in rec.notes.items() if k != "ort_engine"})
                gs[name] = rec
            new = attach_ort_engine(bundle, rec, m.model, warn=warn, int8=int8)
            if new is not rec:
                gs[name] = new
                if prec not in done:
                    done.append(prec)
    if done or force:
        atomic_write_text(bundle / MANIFEST_NAME, dataclasses.replace(m, graphs=graphs).dumps())
    return done
