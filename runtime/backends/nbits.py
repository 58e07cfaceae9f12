"""Weight-only int8 and int4 layers as ``com.microsoft.MatMulNBits``: the one implementation of the lowering.

The portable weight-only int8 graph computes ``MatMul(x, DequantizeLinear(W_int8, scale))`` with one
symmetric scale per output channel. ONNX Runtime's CPU provider keeps ``DequantizeLinear`` out of
constant folding, so run as it is each step would rebuild every fp32 weight. ``MatMulNBits`` reads the
int8 bytes directly (a quarter of fp32's traffic per decode step) and, with ``accuracy_level`` 4,
multiplies them with the activations quantized to int8 per block of inputs at run time: W8A8 with fine
activation blocks. Symmetric per-channel weights map exactly (uint8 with zero point 128, the channel's
scale repeated over its blocks), but in another layout (``[N, blocks, block]``, unsigned).

int4 layers (``DequantizeLinear`` of INT4 codes in blocks along K, one scale per block, opset 21) map to
MatMulNBits ``bits=4``: B ``[N, blocks, block/2]`` uint8 (code + 8, low nibble first), scales
``[N * blocks]``, no zero points (the op's default, 8, is the symmetric code offset).

Engines built by this version keep the portable layout, so the bundle stores the quantized weights once
(``notes["ort_engine"]["lower_at_load"]``), and the ORT backend calls :func:`lower_layers` while it
stages the graph, writing the new layout to the staging folder (``runtime.backends.ort``): ORT then
loads weights that are already in its kernel's layout, so they are in memory once. Engines of earlier
versions hold MatMulNBits already and load as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NBITS_BLOCK = 128  # MatMulNBits block: the activations are quantized per block of this many inputs
NBITS_ACCURACY_LEVEL = 4  # MLAS's int8-compute kernel (levels 0-1 dequantize to fp32: ~4x slower here)


def transpose_bytes(a: np.ndarray, rows: int = 128) -> np.ndarray:
    """``a.T`` (2-D, one-byte elements) as a new C-contiguous array, copied ``rows`` rows at a time: a
    plain strided copy of a large byte matrix runs about 6x slower (cache misses)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for r in range(0, a.shape[0], rows):
        out[:, r:r + rows] = a[r:r + rows].T
    return out


def int8_blocks(w_nk: np.ndarray, scale: np.ndarray, block_size: int = NBITS_BLOCK):
    """``(B, scales, zero_points, block)`` of MatMulNBits (8 bits) for int8 weights ``w_nk`` [N, K] with
    one scale per output channel, or None when no block size (``block_size`` or 16) divides K. A ``w_nk``
    that is the transposed view of a ``[K, N]`` weight is copied in cache-sized blocks."""
    n_out, k = w_nk.shape
    block = next((b for b in (block_size, 16) if k % b == 0), None)
    if block is None:
        return None
    blocks = k // block
    as_bytes = w_nk.view(np.uint8)
    u = transpose_bytes(as_bytes.T) if not w_nk.flags.c_contiguous and w_nk.T.flags.c_contiguous \
        else np.array(as_bytes, order="C")  # a copy: the caller's weights stay as they are
    packed = np.bitwise_xor(u, np.uint8(0x80), out=u).reshape(n_out, blocks, block)  # v + 128 as uint8
    scales = np.repeat(scale.astype(np.float32).reshape(-1), blocks)
    return packed, scales, np.full(n_out * blocks, 128, np.uint8), block


def pack_int4(values: np.ndarray) -> bytes:
    """Two's-complement 4-bit codes, two per byte, the first in the low nibble (ONNX INT4 raw data)."""
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes | np.ndarray, count: int) -> np.ndarray:
    """The ``count`` int4 codes (int8 values in [-8, 7]) packed in ``raw`` (ONNX INT4 raw data)."""
    b = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
    out = np.empty(b.size * 2, np.int8)
    out[0::2] = (b & 0xF).astype(np.int8)
    out[1::2] = (b >> 4).astype(np.int8)
    out = out[:count]
    out[out > 7] -= 16
    return out


def int4_blocks(q_nk: np.ndarray, scales_nb: np.ndarray, block: int):
    """``(B, scales)`` of MatMulNBits (4 bits) for int4 codes ``q_nk`` [N, K] with one scale per block of
    ``block`` inputs (``scales_nb`` [N, K / block]), or None when ``block`` does not fit the kernel."""
    n_out, k = q_nk.shape
    if k % block or block < 16 or block & (block - 1):
        return None
    u = (q_nk.astype(np.int16) + 8).astype(np.uint8).reshape(n_out, k // block, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8), np.ascontiguousarray(scales_nb, np.float32).reshape(-1)


def int4_blocks_from_raw(raw: np.ndarray, dims: tuple[int, int], trans_b: bool, block: int) -> np.ndarray | None:
    """MatMulNBits' B (``[N, blocks, block/2]`` uint8, code + 8, low nibble first) straight from an INT4
    tensor's packed bytes: ``[N, K]`` (``trans_b``) or ``[K, N]``; None when the fast path does not apply
    (odd N in ``[K, N]``: rows do not start on a byte). A two's-complement nibble ``v`` becomes ``v + 8``
    by flipping its top bit, so no value is widened."""
    rows, cols = dims
    raw = raw.reshape(-1).view(np.uint8)
    if trans_b:  # [N, K]: the bytes already run along K, low nibble first
        n_out, k = rows, cols
        if k % 2 or raw.size != n_out * k // 2:
            return None
        return (raw ^ np.uint8(0x88)).reshape(n_out, k // block, block // 2)
    k, n_out = rows, cols
    if n_out % 2 or raw.size != k * n_out // 2:
        return None
    b = raw.reshape(k, n_out // 2)
    u = np.empty((k, n_out), np.uint8)
    np.bitwise_xor(b & np.uint8(0x0F), np.uint8(8), out=u[:, 0::2])
    np.bitwise_xor(b >> np.uint8(4), np.uint8(8), out=u[:, 1::2])
    ut = transpose_bytes(u)  # [N, K]
    del u
    packed = ut[:, 0::2] | (ut[:, 1::2] << np.uint8(4))
    return packed.reshape(n_out, k // block, block // 2)


def quantized_layers(model) -> dict[int, int]:
    """How many ``DequantizeLinear(int8 or int4 2-D weight) -> MatMul/Gemm`` pairs ``model`` has, per bit
    width (nothing is read): what :func:`lower_layers` turns into MatMulNBits."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    bits = {TensorProto.INT8: 8, TensorProto.INT4: 4}
    count = {8: 0, 4: 0}
    for dq in model.graph.node:
        t = inits.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        readers = users.get(dq.output[0], []) if t is not None else []
        if (t is not None and t.data_type in bits and len(t.dims) == 2 and len(readers) == 1
                and readers[0].op_type in ("MatMul", "Gemm") and readers[0].input[1] == dq.output[0]):
            count[bits[t.data_type]] += 1
    return count


def lower_layers(model, load: Callable[[str], np.ndarray | None], store: Callable[[np.ndarray, str], object],
                 *, block_size: int = NBITS_BLOCK) -> dict[int, int]:
    """Replace ``DequantizeLinear(int8 or int4 weight) -> MatMul/Gemm`` in ``model`` (a ModelProto, in
    place) by ``MatMulNBits`` (8 or 4 bits); return the number of layers lowered per bit width. Anything
    else is left alone.

    ``load(name)``: the value of constant ``name`` (None if it is not one; an INT4 tensor as its raw
    packed bytes, a uint8 array); ``store(array, name)``: the TensorProto of a new initializer (its bytes
    kept wherever the caller keeps them). One weight is held at a time."""
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    lowered = {8: 0, 4: 0}
    drop_nodes: set[str] = set()
    drop_inits: set[str] = set()
    new_inits, adds = [], []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        t = inits.get(dq.input[0])
        if t is None or len(users) != 1 or len(t.dims) != 2 or t.data_type not in (TensorProto.INT8, TensorProto.INT4):
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
        dq_attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        axis = int(dq_attrs.get("axis", 1))
        zero = load(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zero is not None and zero.any():
            continue
        name = dq.input[0] + "__nbits"
        if t.data_type == TensorProto.INT8:  # one scale per output channel
            if axis % 2 != (0 if trans_b else 1):
                continue
            q, scale = load(dq.input[0]), load(dq.input[1])
            if q is None or scale is None or scale.size != q.shape[0 if trans_b else 1]:
                continue
            w_nk = q if trans_b else q.T  # [N, K]
            made = int8_blocks(w_nk, scale, block_size)
            if made is None:
                continue
            packed, scales, zero_points, block = made
            n_out, k = w_nk.shape
            del q, w_nk
            tensors = [store(packed, name), store(scales, name + "_scales"), store(zero_points, name + "_zero_points")]
            bits = 8
        else:  # int4 codes in blocks along K
            block = int(dq_attrs.get("block_size", 0))
            if not block or axis % 2 != (1 if trans_b else 0):
                continue
            raw, scale = load(dq.input[0]), load(dq.input[1])
            if raw is None or scale is None:
                continue
            dims = (int(t.dims[0]), int(t.dims[1]))
            n_out, k = dims if trans_b else dims[::-1]
            if k % block or block < 16 or block & (block - 1):
                continue
            s_nb = np.ascontiguousarray(scale if trans_b else scale.T, np.float32).reshape(-1)
            packed = int4_blocks_from_raw(raw, dims, trans_b, block)
            if packed is None:  # the general path: unpack, transpose, pack
                q = unpack_int4(raw, dims[0] * dims[1]).reshape(dims)
                made4 = int4_blocks(q if trans_b else q.T, s_nb.reshape(n_out, -1), block)
                if made4 is None:
                    continue
                packed = made4[0]
            del raw
            tensors = [store(packed, name), store(s_nb, name + "_scales")]
            bits = 4
        new_inits += tensors
        out = mm.output[0] if bias is None else mm.output[0] + "__nobias"
        adds.append(helper.make_node("MatMulNBits", [mm.input[0], *(x.name for x in tensors)], [out],
                                     name=mm.name + "__nbits", domain="com.microsoft", K=k, N=n_out, bits=bits,
                                     block_size=block, accuracy_level=NBITS_ACCURACY_LEVEL))
        if bias is not None:
            adds.append(helper.make_node("Add", [out, bias], [mm.output[0]], name=mm.name + "__bias"))
        drop_nodes.update((dq.name, mm.name))
        drop_inits.update(x for x in dq.input if x in inits)
        lowered[bits] += 1
    if not any(lowered.values()):
        return lowered
    kept = [n for n in graph.node if n.name not in drop_nodes]
    del graph.node[:]
    available = {t.name for t in graph.initializer} | {t.name for t in new_inits} | {i.name for i in graph.input}
    graph.node.extend(_in_order(kept, adds, available))
    still_read = {i for n in graph.node for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name not in drop_inits or t.name in still_read] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
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
