"""Weight-only int8 layers as ``com.microsoft.MatMulNBits`` (8 bits): the one implementation of the lowering.

The portable weight-only int8 graph computes ``MatMul(x, DequantizeLinear(W_int8, scale))`` with one
symmetric scale per output channel. ONNX Runtime's CPU provider keeps ``DequantizeLinear`` out of
constant folding, so run as it is each step would rebuild every fp32 weight. ``MatMulNBits`` reads the
int8 bytes directly (a quarter of fp32's traffic per decode step) and, with ``accuracy_level`` 4,
multiplies them with the activations quantized to int8 per block of inputs at run time: W8A8 with fine
activation blocks. Symmetric per-channel weights map exactly (uint8 with zero point 128, the channel's
scale repeated over its blocks), but in another layout (``[N, blocks, block]``, unsigned).

Engines built by this version keep the portable layout, so the bundle stores the int8 weights once
(``notes["ort_engine"]["int8_at_load"]``), and the ORT backend calls :func:`lower_int8_layers` while it
stages the graph, writing the new layout to the staging folder (``runtime.backends.ort``). Engines of
earlier versions hold MatMulNBits already and load as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NBITS_BLOCK = 128  # MatMulNBits block: the activations are quantized per block of this many inputs
NBITS_ACCURACY_LEVEL = 4  # MLAS's int8-compute kernel (levels 0-1 dequantize to fp32: ~4x slower here)


def int8_blocks(w_nk: np.ndarray, scale: np.ndarray, block_size: int = NBITS_BLOCK):
    """``(B, scales, zero_points, block)`` of MatMulNBits (8 bits) for int8 weights ``w_nk`` [N, K] with
    one scale per output channel, or None when no block size (``block_size`` or 16) divides K."""
    n_out, k = w_nk.shape
    block = next((b for b in (block_size, 16) if k % b == 0), None)
    if block is None:
        return None
    blocks = k // block
    packed = (w_nk.astype(np.int16) + 128).astype(np.uint8).reshape(n_out, blocks, block)
    scales = np.repeat(scale.astype(np.float32).reshape(-1), blocks)
    return packed, scales, np.full(n_out * blocks, 128, np.uint8), block


def int8_layers(model) -> int:
    """How many ``DequantizeLinear(int8 2-D weight) -> MatMul/Gemm`` pairs ``model`` has (nothing is read):
    what :func:`lower_int8_layers` would consider."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    count = 0
    for dq in model.graph.node:
        t = inits.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        readers = users.get(dq.output[0], []) if t is not None else []
        if (t is not None and t.data_type == TensorProto.INT8 and len(t.dims) == 2 and len(readers) == 1
                and readers[0].op_type in ("MatMul", "Gemm") and readers[0].input[1] == dq.output[0]):
            count += 1
    return count


def lower_int8_layers(model, load: Callable[[str], np.ndarray | None], store: Callable[[np.ndarray, str], object],
                      *, block_size: int = NBITS_BLOCK) -> int:
    """Replace ``DequantizeLinear(int8 weight) -> MatMul/Gemm`` in ``model`` (a ModelProto, in place) by
    ``MatMulNBits`` (8 bits); return the number of layers lowered. Anything else is left alone.

    ``load(name)``: the value of constant ``name`` (None if it is not one); ``store(array, name)``: the
    TensorProto of a new initializer (its bytes kept wherever the caller keeps them). One weight is held
    at a time."""
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    lowered = 0
    drop_nodes: set[str] = set()
    drop_inits: set[str] = set()
    new_inits, adds = [], []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        if dq.input[0] not in inits or len(users) != 1 or len(inits[dq.input[0]].dims) != 2 \
                or inits[dq.input[0]].data_type != TensorProto.INT8:  # int4 blocks: ORT fuses those itself
            continue
        mm = users[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        if mm.op_type == "MatMul" and len(mm.input) == 2 and mm.input[1] == dq.output[0]:
            trans_b, bias = False, None
        elif (mm.op_type == "Gemm" and mm.input[1] == dq.output[0] and not attrs.get("transA", 0)
              and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            trans_b, bias = bool(attrs.get("transB", 0)), (mm.input[2] if len(mm.input) > 2 and mm.input[2] else None)
        else:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if axis % 2 != (0 if trans_b else 1):
            continue  # one scale per output channel only
        q, scale = load(dq.input[0]), load(dq.input[1])
        zero = load(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if q is None or scale is None or q.dtype != np.int8 or (zero is not None and zero.any()):
            continue
        w_nk = q if trans_b else q.T  # [N, K]
        if scale.size != w_nk.shape[0]:
            continue
        made = int8_blocks(w_nk, scale, block_size)
        if made is None:
            continue
        packed, scales, zero_points, block = made
        n_out, k = w_nk.shape
        name = dq.input[0] + "__nbits"
        new_inits += [store(packed, name), store(scales, name + "_scales"), store(zero_points, name + "_zero_points")]
        del packed, w_nk, q
        out = mm.output[0] if bias is None else mm.output[0] + "__nobias"
        adds.append(helper.make_node("MatMulNBits", [mm.input[0], name, name + "_scales", name + "_zero_points"],
                                     [out], name=mm.name + "__nbits", domain="com.microsoft", K=k, N=n_out, bits=8,
                                     block_size=block, accuracy_level=NBITS_ACCURACY_LEVEL))
        if bias is not None:
            adds.append(helper.make_node("Add", [out, bias], [mm.output[0]], name=mm.name + "__bias"))
        drop_nodes.update((dq.name, mm.name))
        drop_inits.update(x for x in dq.input if x in inits)
        lowered += 1
    if not lowered:
        return 0
    kept = [n for n in graph.node if n.name not in drop_nodes]
    del graph.node[:]
    available = {t.name for t in graph.initializer} | {t.name for t in new_inits} | {i.name for i in graph.input}
    graph.node.extend(_in_order(kept, adds, available))
    still_read = {i for n in graph.node for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name not in drop_inits or t.name in still_read] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return lowered


def _in_order(nodes: list, adds: list, available: set[str]) -> list:
    """``nodes`` + ``adds`` in an order where each node's inputs come first (a stable topological sort)."""
    ready = set(available) | {""}
    pending = list(nodes) + list(adds)
    out = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # inputs from outside the graph's initializers (e.g. outer scope)
            out.extend(rest)
            break
        pending = rest
    return out
