"""fp32 ONNX graph -> int8 ONNX graph with explicit quantization (QuantizeLinear/DequantizeLinear).

TensorRT 10.1+ deprecates (and 11 removes) implicit int8 and its calibrators; a strongly typed network
takes its int8 from Q/DQ nodes in the ONNX. ONNX Runtime runs the same file. Two recipes:

``static``  activation ranges from calibration (the user's images and prompts, recorded while the fp32
            bundle runs: see ``engines.calibration``), symmetric int8 activations, per-channel symmetric
            int8 weights; ONNX Runtime's ``quantize_static`` inserts the Q/DQ pairs. Only linear layers
            (MatMul with a constant weight, Gemm, Conv) are quantized: LayerNorm, Softmax, attention
            score/value products and the residual stream stay fp32.
``weight``  weight-only int8: each linear weight is stored int8 with a per-output-channel scale and a
            DequantizeLinear in front of its MatMul; activations stay fp32. For the LLM this is the
            faster choice on GPUs (decode is bound by reading weights) and the safer one for accuracy
            (the KV cache and attention never see int8). It needs no calibration.

By default ``vision`` and ``qformer`` use ``static`` and the LLM graphs use ``weight``. Which nodes stay
in higher precision is returned as notes and written to the manifest (``GraphRecord.notes``).
IO stays float32 (the contract's default dtype).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from engines.onnx_utils import ensure_node_names, gemm_as_matmul, load_model, producer_through, toposort
from engines.tensor_store import load_lazy, tensor_array
from runtime.contract import GraphIO, GraphName
from runtime.errors import Blip2Error


class CalibMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class Recipe(str, Enum):
    STATIC = "static"
    WEIGHT = "weight"


LLM_GRAPHS = frozenset({GraphName.DECODER.value, GraphName.ENCODER.value, GraphName.SEQ2SEQ_DECODER.value,
                        GraphName.CROSS_KV.value})
QUANT_OPS = ("MatMul", "Gemm", "Conv")
# Ops that never get Q/DQ (the quantizer only touches QUANT_OPS; listed for the manifest notes).
FLOAT_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Add", "Mul", "Div")


@dataclass
class Int8Result:
    model: object  # onnx.ModelProto
    notes: dict = field(default_factory=dict)


def default_recipe(graph: str) -> Recipe:
    return Recipe.WEIGHT if graph in LLM_GRAPHS else Recipe.STATIC


def float_outputs_nodes(model, io: GraphIO) -> list[str]:
    """Nodes computing outputs the contract keeps float32 at every precision (logits): kept unquantized."""
    out = []
    for spec in io.outputs:
        if spec.name == "logits":
            node = producer_through(model, spec.name, skip=("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"))
            if node is not None:
                out.append(node.name)
    return out


# -- static (calibrated) ---------------------------------------------------------------------------
class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str], progress=None):
        self.feeds = feeds
        self.names = input_names
        self.i = 0
        self.progress = progress

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        f = self.feeds[self.i]
        self.i += 1
        if self.progress is not None:
            self.progress.update(1)
        return {n: np.ascontiguousarray(f[n], dtype=np.float32) if f[n].dtype.kind == "f" else f[n]
                for n in self.names}

    def rewind(self):
        self.i = 0


def quantize_static_graph(src: str | Path, graph: str, io: GraphIO, feeds: list[dict[str, np.ndarray]],
                          method: CalibMethod = CalibMethod.PERCENTILE, percentile: float = 99.99,
                          progress: bool = False, tolerance: float = 0.0) -> Int8Result:
    """Q/DQ-quantize the linear layers of ``src`` with activation ranges from ``feeds``.

    ``tolerance`` > 0: accuracy-aware fallback. The quantized graph's outputs are compared with the fp32
    graph's on (up to :data:`FALLBACK_SAMPLES` of) the calibration feeds; while their relative L2 error
    is above ``tolerance``, whole transformer blocks go back to float, from the last block towards the
    first (quantization noise added late reaches the output least attenuated: measured on the demo ViT,
    its last two of four blocks carried 95% of the error), at most :data:`FALLBACK_MAX_FRACTION` of the
    blocks. Each step quantizes again (calibration included), so a fallback costs a build per step. The
    manifest notes record the error before and after and the blocks kept float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise Blip2Error(f"no calibration samples for graph {graph!r}", hint="check --calib-images")
    model = load_model(src)
    ensure_node_names(model)
    exclude = float_outputs_nodes(model, io)
    quantized_candidates = [n.name for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in exclude]
    methods = {CalibMethod.MINMAX: CalibrationMethod.MinMax, CalibMethod.PERCENTILE: CalibrationMethod.Percentile,
               CalibMethod.ENTROPY: CalibrationMethod.Entropy}
    extra = {
        "ActivationSymmetric": True,  # zero point 0: what TensorRT's explicit quantization expects
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,  # attention Q.K^T and P.V stay float
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
    }
    if method is CalibMethod.PERCENTILE:
        extra["CalibPercentile"] = percentile
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(feeds), desc=f"calibrate {graph}", unit="sample")
    with tempfile.TemporaryDirectory(prefix=".int8-") as work:
        src_named = Path(work) / "named.onnx"
        big = sum(t.ByteSize() for t in model.graph.initializer) > (1 << 30)
        onnx.save_model(model, str(src_named), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="named.onnx.data")
        out = Path(work) / "int8.onnx"

        float_nodes: list[str] = []  # blocks the fallback keeps float

        def run(m: CalibMethod) -> None:
            quantize_static(
                str(src_named), str(out), _Reader(feeds, io.input_names(), bar), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_OPS), per_channel=True, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude + float_nodes, calibrate_method=methods[m],
                use_external_data_format=big, extra_options=extra,
            )

        used, fallback = method, None
        quiet = _quiet_ort_logging()
        shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds}
        if method is not CalibMethod.MINMAX and len(shapes) > 1:
            # ORT's histogram calibrators stack every sample, so they need one shape; decoder samples
            # differ in sequence and past length. Min/max ranges reduce per sample.
            used, fallback = CalibMethod.MINMAX, f"{method.value} needs same-shape samples; used minmax"
        fallback_notes = None
        try:
            try:
                run(used)
            except ValueError as e:
                # ORT's histogram calibrators fail on a near-constant tensor ("Too many bins for data
                # range"); min/max ranges are well defined there, so fall back and say so in the manifest.
                if method is CalibMethod.MINMAX or "bins" not in str(e):
                    raise
                used, fallback = CalibMethod.MINMAX, f"{method.value} failed ({e}); used minmax"
                if bar is not None:
                    bar.reset()
                run(CalibMethod.MINMAX)
            if tolerance > 0:
                fallback_notes = _fall_back(model, quantized_candidates, tolerance, feeds, io, src_named, out,
                                            float_nodes, lambda: run(used), bar)
        finally:
            quiet()
            if bar is not None:
                bar.close()
        qmodel = load_model(out)
    quantized_candidates = [n for n in quantized_candidates if n not in float_nodes]
    exclude = exclude + float_nodes
    toposort(qmodel)
    ops = [n.op_type for n in qmodel.graph.node]
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in FLOAT_OPS})
    notes = {
        "transform": "int8",
        "recipe": Recipe.STATIC.value,
        "calibration": {"method": used.value, "samples": len(feeds),
                        **({"percentile": percentile} if used is CalibMethod.PERCENTILE else {}),
                        **({"fallback": fallback} if fallback else {})},
        "activations": "int8 symmetric, per tensor", "weights": "int8 symmetric, per output channel",
        "quantize_linear_nodes": ops.count("QuantizeLinear"),
        "dequantize_linear_nodes": ops.count("DequantizeLinear"),
        "linear_layers_quantized": len(quantized_candidates),
        "kept_float32": {"nodes": exclude, "op_types": kept,
                         "also": "attention score/value MatMuls (no constant weight), residual adds"},
    }
    if fallback_notes is not None:
        notes["float_fallback"] = fallback_notes
    return Int8Result(qmodel, notes)


# -- accuracy-aware fallback -----------------------------------------------------------------------
FALLBACK_SAMPLES = 16  # calibration feeds the output error is measured on
FALLBACK_MAX_FRACTION = 0.5  # of the blocks, at most this many go back to float
_BLOCK = re.compile(r"(?:^|[/.])(?:layers?|blocks?|h)\.(\d+)(?=[/.]|$)")


def linear_blocks(model, nodes: list[str]) -> list[list[str]]:
    """``nodes`` grouped by the transformer block their name places them in (``.../layers.3/...``,
    ``.../layer.3/...``: torch.onnx scopes), in graph order; a node outside any block is a group of its
    own (the patch embedding, the language projection)."""
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    groups: dict[str, list[str]] = {}
    for name in sorted(nodes, key=lambda n: order.get(n, 0)):
        m = _BLOCK.search(name)
        groups.setdefault(name[:m.end()] if m else name, []).append(name)
    return list(groups.values())


def graph_outputs(path: Path, feeds: list[dict[str, np.ndarray]], io: GraphIO) -> list[list[np.ndarray]]:
    """The float outputs of the graph at ``path`` for each of ``feeds`` (CPU, ONNX Runtime)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"]
    inputs = io.input_names()
    return [sess.run(names, {n: f[n] for n in inputs}) for f in feeds]


def output_error(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Relative L2 error of ``candidate``'s outputs against ``reference``'s (both from :func:`graph_outputs`)."""
    num = den = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        for a, b in zip(ref, cand, strict=True):
            num += float(np.square(a.astype(np.float64) - b).sum())
            den += float(np.square(a.astype(np.float64)).sum())
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _fall_back(model, candidates: list[str], tolerance: float, feeds, io: GraphIO, src: Path, out: Path,
               float_nodes: list[str], requantize, bar) -> dict:
    """Keep blocks float (appending to ``float_nodes``, re-running ``requantize`` into ``out``) from the
    last block back until the output error is within ``tolerance``; return the notes."""
    sample = feeds[:: max(1, len(feeds) // FALLBACK_SAMPLES)][:FALLBACK_SAMPLES]
    reference = graph_outputs(src, sample, io)  # the fp32 graph runs once
    first = err = output_error(reference, graph_outputs(out, sample, io))
    blocks = linear_blocks(model, candidates)
    limit = int(len(blocks) * FALLBACK_MAX_FRACTION)
    kept: list[list[str]] = []
    while err > tolerance and len(kept) < limit:
        kept.append(blocks[len(blocks) - 1 - len(kept)])
        float_nodes.extend(kept[-1])
        if bar is not None:
            bar.reset()
        requantize()
        err = output_error(reference, graph_outputs(out, sample, io))
    return {"tolerance": tolerance, "samples": len(sample), "error_all_int8": round(first, 5),
            "error": round(err, 5), "met": err <= tolerance, "blocks": len(blocks),
            "float_blocks": [_block_name(b) for b in reversed(kept)]}


def _block_name(nodes: list[str]) -> str:
    m = _BLOCK.search(nodes[0])
    return nodes[0][:m.end()] if m else nodes[0]


def _quiet_ort_logging():
    """ORT's quantizer logs advice on the root logger and prints progress to stdout; hide both during a
    build (our own progress bar says what is happening). Returns the function that undoes it."""
    import contextlib
    import io
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    redirect = contextlib.redirect_stdout(io.StringIO())
    redirect.__enter__()

    def undo() -> None:
        redirect.__exit__(None, None, None)
        root.setLevel(level)

    return undo


# -- weight-only -----------------------------------------------------------------------------------
QUANTIZE_LOGITS = True  # weight-only recipe: the LM head's weight is int8 too (see quantize_weights)


def quantize_weights(src: str | Path, graph: str, io: GraphIO, exclude: tuple[str, ...] = (),
                     logits: bool | None = None) -> Int8Result:
    """Store every constant 2-D weight of a MatMul/Gemm as int8 + per-output-channel scale (DequantizeLinear).

    The nodes named in ``exclude`` keep their fp32 weights. ``logits`` (default :data:`QUANTIZE_LOGITS`):
    whether the layer computing ``logits`` (the LM head) is quantized too. It is the largest weight of a
    small LLM (a third of OPT-125M's bytes), so at decode, where every step reads all weights, leaving it
    fp32 would cost more than all other layers together; its output, like every activation here, stays
    float32.

    The graph is read without its weights (:func:`engines.tensor_store.load_lazy`): each fp32 weight is
    read, quantized and dropped in turn, so at most the int8 weights (a quarter of the fp32 bytes) are
    held; the weights left fp32 stay on disk until the result is saved (``save_model_atomic``).
    """
    from onnx import TensorProto, helper, numpy_helper


    model = load_lazy(src)
    ensure_node_names(model)
    if not (QUANTIZE_LOGITS if logits is None else logits):
        exclude = (*exclude, *float_outputs_nodes(model, io))
    inits = {t.name: t for t in model.graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list = []
    skipped = list(exclude)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.name in exclude or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in done or w not in inits or inits[w].data_type != TensorProto.FLOAT or len(inits[w].dims) != 2:
            continue
        arr = tensor_array(inits[w]).astype(np.float32, copy=False)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        if trans_b and gemm_as_matmul(node, w, model.graph.node, new_nodes):
            arr, trans_b = np.ascontiguousarray(arr.T), False  # MatMul(x, W^T) + Add: [K, N], rows kept whole
        axis = 0 if trans_b else 1  # the output-channel axis of the weight
        q, scale = quantize_per_channel(arr, axis)
        del arr
        qi = numpy_helper.from_array(q, w + "__int8")
        si = numpy_helper.from_array(scale, w + "__scale")
        zi = numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), w + "__zero")
        model.graph.initializer.remove(inits[w])
        model.graph.initializer.extend([qi, si, zi])
        new_nodes.append(helper.make_node("DequantizeLinear", [qi.name, si.name, zi.name], [w], axis=axis,
                                          name=w + "__dequantize"))
        done[w] = node.name
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)
    toposort(model)
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    notes = {
        "transform": "int8",
        "recipe": Recipe.WEIGHT.value,
        "weights": "int8 symmetric, per output channel (DequantizeLinear before each MatMul/Gemm)",
        "activations": "float32 (weight-only: the KV cache, attention and norms never see int8)",
        "linear_layers_quantized": len(done),
        "kept_float32": {"nodes": skipped, "embedding_tables": gathers,
                         "op_types": sorted({n.op_type for n in nodes if n.op_type in FLOAT_OPS})},
    }
    return Int8Result(model, notes)


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along ``axis``: w ~= q * scale."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=other)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale
