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


NBITS_BLOCK = 128  # MatMulNBits block: the activations are quantized per block of this many inputs
NBITS_ACCURACY_LEVEL = 4  # MLAS's int8-compute kernel (levels 0-1 dequantize to fp32: ~4x slower here)


def lower_int8_weights(model, *, block_size: int = NBITS_BLOCK, writer=None) -> int:
    """Replace ``DequantizeLinear(int8 weight) -> MatMul/Gemm`` by ``com.microsoft.MatMulNBits`` (8 bits).

    ``int8="nbits"``: MatMulNBits reads the int8 bytes directly (a quarter of fp32's memory traffic per
    decode step) and, with ``accuracy_level`` 4, multiplies them with the activations quantized to int8
    per block of ``block_size`` inputs at run time (one scale per block of each row): W8A8 with fine
    activation blocks rather than the recipe's weight-only arithmetic. Symmetric per-channel weights map
    exactly (uint8 with zero point 128, the channel's scale repeated over its blocks). Returns the
    number of layers lowered; anything else is left alone. ``writer``: as for :func:`fold_int8_weights`.
    """
    from onnx import helper


    graph = model.graph
    g = GraphView(model)
    lowered = 0
    drop_nodes: set[str] = set()
    drop_inits: set[str] = set()
    new_inits, adds = [], []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q, scale = g.const(dq.input[0]), g.const(dq.input[1])
        zero = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        users = g.consumers.get(dq.output[0], [])
        if (q is None or scale is None or q.dtype != np.int8 or q.ndim != 2 or len(users) != 1
                or (zero is not None and zero.any()) or dq.input[0] not in g.inits):
            continue
        mm = users[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if mm.op_type == "MatMul" and len(mm.input) == 2 and mm.input[1] == dq.output[0]:
            trans_b, bias = False, None
        elif (mm.op_type == "Gemm" and mm.input[1] == dq.output[0] and not attrs.get("transA", 0)
              and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            trans_b, bias = bool(attrs.get("transB", 0)), (mm.input[2] if len(mm.input) > 2 and mm.input[2] else None)
        else:
            continue
        w_nk = q if trans_b else q.T  # [N, K]
        channel_axis = 0 if trans_b else 1
        if axis % 2 != channel_axis or scale.size != w_nk.shape[0]:
            continue
        n_out, k = w_nk.shape
        block = next((b for b in (block_size, 16) if k % b == 0), None)
        if block is None:
            continue
        blocks = k // block
        name = dq.input[0] + "__nbits"
        packed = (w_nk.astype(np.int16) + 128).astype(np.uint8).reshape(n_out, blocks, block)
        new_inits += [make_tensor(packed, name, writer),
                      make_tensor(np.repeat(scale.astype(np.float32).reshape(-1), blocks), name + "_scales", writer),
                      make_tensor(np.full(n_out * blocks, 128, np.uint8), name + "_zero_points", writer)]
        del packed, w_nk, q
        out = mm.output[0] if bias is None else mm.output[0] + "__nobias"
        adds.append(helper.make_node("MatMulNBits", [mm.input[0], name, name + "_scales", name + "_zero_points"],
                                     [out], name=mm.name + "__nbits", domain="com.microsoft", K=k, N=n_out, bits=8,
                                     block_size=block, accuracy_level=NBITS_ACCURACY_LEVEL))
        if bias is not None:
            adds.append(helper.make_node("Add", [out, bias], [mm.output[0]], name=mm.name + "__bias"))
        drop_nodes.update((dq.name, mm.name))
        drop_inits.update(x for x in dq.input if x in g.inits)
        lowered += 1
    if not lowered:
        return 0
    kept = [n for n in graph.node if n.name not in drop_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    toposort_append(graph, adds)
    inits = [t for t in graph.initializer if t.name not in drop_inits] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(inits)
    prune(graph)
    return lowered


def pack_qkv(model, writer=None) -> int:
    """Compute each layer's query, key and value projections as one matmul feeding a packed
    ``GroupQueryAttention`` (its ``query`` input holds q|k|v; ``key``/``value`` left empty).

    At batch 1 a decode step's 768x768 projections are small enough that dispatching each one costs
    about as much as reading its weight; one 768x2304 product per layer reads the same bytes in one go.
    Works on constant fp32 weights (``MatMul``) and on ``MatMulNBits``; the values are the same (the
    output columns are just concatenated). Returns the number of layers packed. ``writer``: as for
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
        axis = 1 if mms[0].op_type == "MatMul" else 0  # MatMul: [K, N]; MatMulNBits: [N, blocks, block]
        tensors = [make_tensor(np.concatenate([p[3][0] for p in parts], axis=axis), f"{name}/weight", writer)]
        inputs = [x, tensors[0].name]
        for j, suffix in enumerate(("scales", "zero_points")[:len(mms[0].input) - 2]):
            tensors.append(make_tensor(np.concatenate([p[3][j + 1] for p in parts]), f"{name}/{suffix}", writer))
            inputs.append(tensors[-1].name)
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
