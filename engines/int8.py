"""fp32 ONNX graph -> int8 ONNX graph with explicit quantization (QuantizeLinear/DequantizeLinear).

TensorRT 10.1+ deprecates (and 11 removes) implicit int8 and its calibrators; a strongly typed network
takes its int8 from Q/DQ nodes in the ONNX. ONNX Runtime runs the same file. Two recipes:

``static``  activation ranges from calibration (the user's images and prompts, recorded while the fp32
            bundle runs: see ``engines.calibration``; the ranges themselves: ``engines.ranges``),
            symmetric int8 activations, per-channel symmetric int8 weights, Q/DQ pairs inserted here
            (:func:`quantize_static_graph`, which streams the weights: ONNX Runtime's own quantizer
            holds the whole fp32 graph several times over). Only linear layers (MatMul with a constant
            weight, Gemm, Conv) are quantized: LayerNorm, Softmax, attention score/value products and
            the residual stream stay fp32.
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
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from engines.onnx_utils import (
    cpu_session,
    ensure_node_names,
    gemm_as_matmul,
    probe_session,
    producer_through,
    toposort,
)
from engines.tensor_store import LinkedFolder, load_lazy, tensor_array
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
@dataclass(frozen=True)
class LinearLayer:
    """A node the static recipe quantizes: its constant weight (an initializer), the weight's
    output-channel axis, and its constant bias (Gemm, Conv) if any."""

    node: str
    op: str
    x: str  # the activation input
    weight: str
    axis: int
    bias: str | None


def linear_layers(model, exclude: list[str] | tuple[str, ...] = ()) -> list[LinearLayer]:
    """The MatMul / Gemm / Conv nodes of ``model`` whose weight is a constant float initializer (attention
    products of two activations are not among them), minus ``exclude``, in graph order."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANT_OPS or n.name in exclude or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is None or w.data_type != TensorProto.FLOAT or n.input[0] in inits:
            continue
        if n.op_type == "MatMul":
            if len(w.dims) != 2:
                continue
            axis = 1
        elif n.op_type == "Gemm":
            attrs = {a.name: a.i for a in n.attribute}
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
        else:  # Conv: [out_channels, in/groups, k...]
            axis = 0
        bias = n.input[2] if len(n.input) > 2 and n.input[2] in inits else None
        out.append(LinearLayer(n.name, n.op_type, n.input[0], w.name, axis, bias))
    return out


def quantize_static_graph(src: str | Path, graph: str, io: GraphIO, feeds: list[dict[str, np.ndarray]],
                          method: CalibMethod = CalibMethod.PERCENTILE, percentile: float = 99.99,
                          progress: bool = False, tolerance: float = 0.0) -> Int8Result:
    """Q/DQ-quantize the linear layers of ``src`` with activation ranges from ``feeds``.

    Each linear layer (MatMul / Gemm / Conv with a constant weight) gets a ``QuantizeLinear ->
    DequantizeLinear`` pair on its activation input (int8, zero point 0, one scale per tensor: the
    range :mod:`engines.ranges` picks) and an int8 weight with one scale per output channel behind a
    ``DequantizeLinear``; a Gemm's or Conv's bias becomes int32 at the product's scale. Everything else
    (LayerNorm, Softmax, the attention products of two activations, residual adds, the layers' outputs)
    stays float.

    Memory: the graph is read without its weights (:func:`engines.tensor_store.load_lazy`). The ranges
    come from ONNX Runtime running the fp32 graph once per feed and pass, with the activations added to
    its outputs; then each weight is read, quantized and kept in int8 (a quarter of the fp32 bytes), one
    at a time. The fp32 graph and the int8 one are never loaded together.

    ``tolerance`` > 0: accuracy-aware fallback. The quantized graph's outputs are compared with the fp32
    graph's on (up to :data:`FALLBACK_SAMPLES` of) the calibration feeds; while their relative L2 error
    is above ``tolerance``, whole transformer blocks go back to float, from the last block towards the
    first (quantization noise added late reaches the output least attenuated: measured on the demo ViT,
    its last two of four blocks carried 95% of the error), at most :data:`FALLBACK_MAX_FRACTION` of the
    blocks. The ranges are measured once, on the fp32 graph; each step writes and runs the graph again.
    The manifest notes record the error before and after and the blocks kept float.
    """
    from engines.ranges import RangeObserver

    if not feeds:
        raise Blip2Error(f"no calibration samples for graph {graph!r}", hint="check --calib-images")
    src = Path(src)
    model = load_lazy(src)
    ensure_node_names(model)
    exclude = float_outputs_nodes(model, io)
    layers = linear_layers(model, exclude)
    candidates = [la.node for la in layers]
    observer = RangeObserver(method.value, percentile)
    sample = feeds[:: max(1, len(feeds) // FALLBACK_SAMPLES)][:FALLBACK_SAMPLES] if tolerance > 0 else []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(feeds) * observer.passes, desc=f"calibrate {graph}", unit="sample")
    with LinkedFolder(src) as work:
        try:
            reference = observe_ranges(work, model, sorted({la.x for la in layers}), feeds, io, observer, sample, bar)
        finally:
            if bar is not None:
                bar.close()
        amax = observer.ranges({la.x for la in layers})
        weights = _QuantizedWeights(model)
        float_nodes: list[str] = []
        fallback_notes = None
        if tolerance > 0:
            fallback_notes = _fall_back(model, layers, amax, weights, tolerance, reference, sample, io, work,
                                        float_nodes)
        qmodel = qdq_model(model, [la for la in layers if la.node not in float_nodes], amax, weights)
    quantized = [n for n in candidates if n not in float_nodes]
    exclude = exclude + float_nodes
    toposort(qmodel)
    ops = [n.op_type for n in qmodel.graph.node]
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in FLOAT_OPS})
    notes = {
        "transform": "int8",
        "recipe": Recipe.STATIC.value,
        "calibration": {"method": method.value, "samples": len(feeds),
                        **({"percentile": percentile} if method is CalibMethod.PERCENTILE else {})},
        "activations": "int8 symmetric, per tensor (the linear layers' inputs)",
        "weights": "int8 symmetric, per output channel",
        "quantize_linear_nodes": ops.count("QuantizeLinear"),
        "dequantize_linear_nodes": ops.count("DequantizeLinear"),
        "linear_layers_quantized": len(quantized),
        "kept_float32": {"nodes": exclude, "op_types": kept,
                         "also": "attention score/value MatMuls (no constant weight), residual adds, "
                                 "the linear layers' outputs"},
    }
    if fallback_notes is not None:
        notes["float_fallback"] = fallback_notes
    return Int8Result(qmodel, notes)


def observe_ranges(work: Path, model, tensors: list[str], feeds: list[dict[str, np.ndarray]], io: GraphIO,
                   observer, sample: list[dict[str, np.ndarray]], bar=None) -> list[list[np.ndarray]]:
    """Run the fp32 graph (``model``, read lazily) on every feed, ``observer.passes`` times, handing the
    values of ``tensors`` to ``observer``; return the graph's float outputs on ``sample`` (the fallback's
    reference), taken in the first pass."""
    outputs = {o.name for o in model.graph.output}
    sess = probe_session(model, tensors, work, level="basic")
    inputs = io.input_names()
    floats = [o.name for o in sess.get_outputs() if o.type == "tensor(float)" and o.name in outputs]
    names = list(tensors)
    picked = {id(f) for f in sample}
    reference: list[list[np.ndarray]] = []
    for p in range(observer.passes):
        for f in feeds:
            want = names + (floats if p == 0 and id(f) in picked else [])
            got = sess.run(want, {n: _feed_value(f[n]) for n in inputs})
            observer.observe(dict(zip(names, got[:len(names)])))
            if len(want) > len(names):
                reference.append(got[len(names):])
            if bar is not None:
                bar.update(1)
        observer.next_pass()
    del sess
    return reference


def _feed_value(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32) if a.dtype.kind == "f" else a


class _QuantizedWeights:
    """int8 weights with their per-channel scales, made once per weight (read from disk one at a time)
    and kept for every graph the fallback writes."""

    def __init__(self, model):
        self.inits = {t.name: t for t in model.graph.initializer}
        self.done: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, name: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
        key = (name, axis)
        if key not in self.done:
            arr = tensor_array(self.inits[name]).astype(np.float32, copy=False)
            self.done[key] = quantize_per_channel(arr, axis)
            del arr
        return self.done[key]

    def value(self, name: str) -> np.ndarray:
        return tensor_array(self.inits[name]).astype(np.float32, copy=False)


def activation_scale(amax: float) -> np.float32:
    return np.float32(amax / 127.0) if amax > 0 and np.isfinite(amax) else np.float32(1.0)


def qdq_model(model, layers: list[LinearLayer], amax: dict[str, float], weights: _QuantizedWeights):
    """A copy of ``model`` (read lazily) with ``layers`` quantized: a QuantizeLinear/DequantizeLinear pair
    per activation (shared by the layers that read it), an int8 weight + DequantizeLinear per layer
    weight, an int32 bias + DequantizeLinear where a layer has a bias. Names follow ONNX Runtime's
    quantizer (``<w>_quantized``, ``<w>_scale``, ``<w>_zero_point``, ``<x>_QuantizeLinear_Output``...),
    which the runtime's int8 weight forms and tests read. Weights it no longer uses are dropped."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = {n.name: n for n in graph.node}
    new_inits: list = []
    new_nodes: list = []
    act_out: dict[str, str] = {}
    weight_out: dict[str, str] = {}
    for la in layers:
        node = nodes[la.node]
        if la.x not in act_out:
            s = numpy_helper.from_array(np.array(activation_scale(amax.get(la.x, 0.0)), np.float32), f"{la.x}_scale")
            z = numpy_helper.from_array(np.array(0, np.int8), f"{la.x}_zero_point")
            q_out, dq_out = f"{la.x}_QuantizeLinear_Output", f"{la.x}_DequantizeLinear_Output"
            new_inits += [s, z]
            new_nodes += [helper.make_node("QuantizeLinear", [la.x, s.name, z.name], [q_out],
                                           name=f"{la.x}_QuantizeLinear"),
                          helper.make_node("DequantizeLinear", [q_out, s.name, z.name], [dq_out],
                                           name=f"{la.x}_DequantizeLinear")]
            act_out[la.x] = dq_out
        q, w_scale = weights.get(la.weight, la.axis)
        if la.weight not in weight_out:
            wq = numpy_helper.from_array(q, f"{la.weight}_quantized")
            ws = numpy_helper.from_array(w_scale, f"{la.weight}_scale")
            wz = numpy_helper.from_array(np.zeros_like(w_scale, dtype=np.int8), f"{la.weight}_zero_point")
            new_inits += [wq, ws, wz]
            w_out = f"{la.weight}_DequantizeLinear_Output"
            new_nodes.append(helper.make_node("DequantizeLinear", [wq.name, ws.name, wz.name], [w_out],
                                              axis=la.axis, name=f"{la.weight}_DequantizeLinear"))
            weight_out[la.weight] = w_out
        node.input[0] = act_out[la.x]
        node.input[1] = weight_out[la.weight]
        if la.bias is not None:
            b = weights.value(la.bias).reshape(-1)
            if b.shape == w_scale.shape:
                b_scale = (w_scale * activation_scale(amax.get(la.x, 0.0))).astype(np.float32)
                bq = np.clip(np.rint(b / b_scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
                name = f"{la.bias}_{la.node}" if la.bias in weight_out else la.bias
                bi = numpy_helper.from_array(bq, f"{name}_quantized")
                bs = numpy_helper.from_array(b_scale, f"{name}_quantized_scale")
                bz = numpy_helper.from_array(np.zeros_like(bq), f"{name}_quantized_zero_point")
                new_inits += [bi, bs, bz]
                b_out = f"{name}_DequantizeLinear_Output"
                new_nodes.append(helper.make_node("DequantizeLinear", [bi.name, bs.name, bz.name], [b_out],
                                                  axis=0, name=f"{name}_DequantizeLinear"))
                node.input[2] = b_out
                weight_out.setdefault(la.bias, b_out)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + body)
    graph.initializer.extend(new_inits)
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    toposort(out)
    return out


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
    sess = cpu_session(path)
    names = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"]
    inputs = io.input_names()
    return [sess.run(names, {n: _feed_value(f[n]) for n in inputs}) for f in feeds]


def output_error(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Relative L2 error of ``candidate``'s outputs against ``reference``'s (both from :func:`graph_outputs`)."""
    num = den = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        for a, b in zip(ref, cand, strict=True):
            num += float(np.square(a.astype(np.float64) - b).sum())
            den += float(np.square(a.astype(np.float64)).sum())
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _fall_back(model, layers: list[LinearLayer], amax: dict[str, float], weights, tolerance: float,
               reference: list[list[np.ndarray]], sample: list[dict[str, np.ndarray]], io: GraphIO, work: Path,
               float_nodes: list[str]) -> dict:
    """Keep blocks float (appending their nodes to ``float_nodes``) from the last block back until the
    output error on ``sample`` is within ``tolerance``; return the notes. Each step writes the int8 graph
    into ``work`` and runs it."""

    def error() -> float:
        from engines.tensor_store import save_streaming

        q = qdq_model(model, [la for la in layers if la.node not in float_nodes], amax, weights)
        path = work / "int8-step.onnx"
        save_streaming(q, path, external_threshold=0)
        del q
        try:
            return output_error(reference, graph_outputs(path, sample, io))
        finally:
            for f in work.glob("int8-step.onnx*"):
                f.unlink()

    first = err = error()
    blocks = linear_blocks(model, [la.node for la in layers])
    limit = int(len(blocks) * FALLBACK_MAX_FRACTION)
    kept: list[list[str]] = []
    while err > tolerance and len(kept) < limit:
        kept.append(blocks[len(blocks) - 1 - len(kept)])
        float_nodes.extend(kept[-1])
        err = error()
    return {"tolerance": tolerance, "samples": len(sample), "error_all_int8": round(first, 5),
            "error": round(err, 5), "met": err <= tolerance, "blocks": len(blocks),
            "float_blocks": [_block_name(b) for b in reversed(kept)]}


def _block_name(nodes: list[str]) -> str:
    m = _BLOCK.search(nodes[0])
    return nodes[0][:m.end()] if m else nodes[0]


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
    """Symmetric int8 with one scale per slice along ``axis``: w ~= q * scale.

    Worked through in slabs of :data:`SLAB_BYTES` along the first axis, so the float temporaries stay
    small whatever the weight's size (an LM head is 0.5 GB in fp32)."""
    w = np.asarray(w)
    if w.ndim == 0:
        w = w.reshape(1)
    rows = max(1, SLAB_BYTES // max(1, w[0].nbytes)) if w.shape[0] else 1
    other = tuple(i for i in range(w.ndim) if i != axis)
    if axis == 0:
        amax = np.concatenate([np.abs(w[i:i + rows]).max(axis=other) for i in range(0, w.shape[0], rows)])
    else:
        amax = np.zeros(w.shape[axis], np.float32)
        for i in range(0, w.shape[0], rows):
            np.maximum(amax, np.abs(w[i:i + rows]).max(axis=other), out=amax)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.empty(w.shape, np.int8)
    for i in range(0, w.shape[0], rows):
        part = w[i:i + rows] / (scale[i:i + rows] if axis == 0 else scale).reshape(shape)
        np.rint(part, out=part)
        np.clip(part, -127, 127, out=part)
        q[i:i + rows] = part
    return q, scale


SLAB_BYTES = 16 << 20
