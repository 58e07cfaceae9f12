"""Weight-only int8 layers for ONNX Runtime: lowered to ``MatMulNBits`` (8 bits) or folded to fp32, and q/k/v
projections packed into one matmul."""

from __future__ import annotations

import numpy as np

from engines.ort.graph import GraphView, const_source, const_value, prune, toposort_append
from engines.tensor_store import make_tensor

INT8_MODES = ("fold", "nbits")


def fold_int8_weights(model, writer=None) -> int:
    """Replace each ``DequantizeLinear`` of a constant int8 weight by its fp32 result, computed once.

    The weight-only int8 recipe dequantizes its weights in the graph, and ONNX Runtime's CPU provider
    keeps ``DequantizeLinear`` out of constant folding, so it would rebuild every fp32 weight at every
    step. Folding gives exactly the values the graph computes (int8 * scale, in fp32) without the
    per-step work; the step then reads fp32 weights. Returns the number of weights folded.
    ``writer`` (:class:`engines.tensor_store.DataWriter`): where each new weight goes as soon as it is made.
    """

    graph = model.graph
    g = GraphView(model)
    folded = 0
    drop_nodes: set[str] = set()
    drop_inits: set[str] = set()
    new_inits: list = []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q, scale = g.const(dq.input[0]), g.const(dq.input[1])
        zero = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if q is None or scale is None or q.dtype != np.int8 or dq.input[0] not in g.inits:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = -1
        zp = 0 if zero is None else zero.astype(np.int32).reshape(shape)
        w = ((q.astype(np.int32) - zp).astype(np.float32) * scale.astype(np.float32).reshape(shape))
        new_inits.append(make_tensor(w.astype(np.float32), dq.output[0], writer))
        del q, w
        drop_nodes.add(dq.name)
        drop_inits.update(x for x in dq.input if x in g.inits)
        folded += 1
    if folded:
        kept = [n for n in graph.node if n.name not in drop_nodes]
        del graph.node[:]
        graph.node.extend(kept)
        inits = [t for t in graph.initializer if t.name not in drop_inits] + new_inits
        del graph.initializer[:]
        graph.initializer.extend(inits)
        prune(graph)
    return folded


def _int8_dq_weight(g: GraphView, mm) -> list | None:
    """``[q, scale, zero point]`` of a MatMul whose weight is ``DequantizeLinear`` of a constant int8
    ``[K, N]`` with one scale per output channel (the weight-only int8 form), else None."""
    dq = g.producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.consumers.get(dq.output[0], [])) != 1:
        return None
    if next((a.i for a in dq.attribute if a.name == "axis"), 1) != 1 or len(dq.input) != 3:
        return None
    q, scale, zero = (const_value(g, x) for x in dq.input)
    if q is None or scale is None or zero is None or q.dtype != np.int8 or q.ndim != 2 or zero.any():
        return None
    if scale.shape != (q.shape[1],) or zero.shape != (q.shape[1],):
        return None
    return [q, scale, zero]


def pack_qkv(model, writer=None) -> int:
    """Compute each layer's query, key and value projections as one matmul feeding a packed
    ``GroupQueryAttention`` (its ``query`` input holds q|k|v; ``key``/``value`` left empty).

    At batch 1 a decode step's 768x768 projections are small enough that dispatching each one costs
    about as much as reading its weight; one 768x2304 product per layer reads the same bytes in one go.
    Works on constant fp32 weights (``MatMul``), on int8 weights behind a per-channel ``DequantizeLinear``
    (kept in that form: the runtime lowers it at load) and on ``MatMulNBits``; the values are the same
    (the output columns are just concatenated). Returns the number of layers packed. ``writer``: as for
    :func:`fold_int8_weights`.
    """
    from onnx import helper


    graph = model.graph
    g = GraphView(model)
    packed = 0
    adds: list = []
    new_inits: list = []
    drop: set[str] = set()
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        if len(gqa.input) < 3 or not gqa.input[1] or not gqa.input[2]:
            continue
        parts = []
        for t in gqa.input[:3]:
            add = g.producer.get(t)
            if add is None or add.op_type != "Add" or len(g.consumers.get(t, [])) != 1:
                break
            bias_i = next((i for i, x in enumerate(add.input) if const_source(g, x) is not None), None)
            if bias_i is None:
                break
            bias = const_value(g, add.input[bias_i])
            mm = g.producer.get(add.input[1 - bias_i])
            if (bias is None or bias.ndim != 1 or mm is None or mm.op_type not in ("MatMul", "MatMulNBits")
                    or len(g.consumers.get(mm.output[0], [])) != 1):
                break
            if mm.op_type == "MatMulNBits" and len(mm.input) not in (3, 4):  # 3: int4, default zero points
                break
            weights = _int8_dq_weight(g, mm) if mm.op_type == "MatMul" else None
            if weights is None:
                weights = [const_value(g, x) for x in mm.input[1:]]
            if any(w is None for w in weights) or (mm.op_type == "MatMul" and weights[0].ndim != 2):
                break
            parts.append((add, mm, bias, weights))
        if len(parts) != 3:
            continue
        mms = [p[1] for p in parts]
        x = mms[0].input[0]
        attrs = [{a.name: helper.get_attribute_value(a) for a in m.attribute} for m in mms]
        if any(m.input[0] != x or m.op_type != mms[0].op_type for m in mms) or any(
                {k: v for k, v in a.items() if k != "N"} != {k: v for k, v in attrs[0].items() if k != "N"}
                for a in attrs):
            continue
        name = f"{gqa.name}/qkv"
        dq = len(parts[0][3]) == 3 and mms[0].op_type == "MatMul"  # int8 behind DequantizeLinear
        if dq != all(len(p[3]) == 3 for p in parts):
            continue
        axis = 1 if mms[0].op_type == "MatMul" else 0  # MatMul: [K, N]; MatMulNBits: [N, blocks, block]
        tensors = [make_tensor(np.concatenate([p[3][0] for p in parts], axis=axis), f"{name}/weight", writer)]
        inputs = [x, tensors[0].name]
        suffixes = ("scales", "zero_points")[:2 if dq else len(mms[0].input) - 2]
        for j, suffix in enumerate(suffixes):
            tensors.append(make_tensor(np.concatenate([p[3][j + 1] for p in parts]), f"{name}/{suffix}", writer))
            inputs.append(tensors[-1].name)
        if dq:  # the packed int8 weight keeps the portable form: DequantizeLinear (per channel) -> MatMul
            adds.append(helper.make_node("DequantizeLinear", inputs[1:], [f"{name}/weight_dq"], axis=1,
                                         name=f"{name}/DequantizeLinear"))
            inputs = [x, f"{name}/weight_dq"]
        tensors.append(make_tensor(np.concatenate([p[2] for p in parts]), f"{name}/bias", writer))
        for p in parts:
            p[3].clear()  # this layer's weights are written: let them go before the next layer's are read
        weights = []
        node_attrs = dict(attrs[0])
        if "N" in node_attrs:
            node_attrs["N"] = sum(a["N"] for a in attrs)
        adds.append(helper.make_node(mms[0].op_type, inputs, [f"{name}/raw"], name=f"{name}/MatMul",
                                     domain=mms[0].domain or None, **node_attrs))
        adds.append(helper.make_node("Add", [f"{name}/raw", tensors[-1].name], [f"{name}/out"], name=f"{name}/Add"))
        new_inits += tensors
        gqa.input[0], gqa.input[1], gqa.input[2] = f"{name}/out", "", ""
        drop.update(n.name for p in parts for n in p[:2])
        packed += 1
    if packed:
        kept = [n for n in graph.node if n.name not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
        toposort_append(graph, adds)
        prune(graph)
    return packed
