"""ONNX Runtime build of a decoder graph: fused attention and a KV cache updated in place.

The exported decoder (``runtime.contract.decoder_io``) computes attention from primitive ops and
grows its cache by ``Concat`` each step: every step copies the whole cache, and ONNX Runtime's stock
optimizer does not fuse the attention that transformers 5.x exports. This module rewrites each
layer's attention into one ``com.microsoft.GroupQueryAttention`` node, whose CPU and CUDA kernels
write the new keys/values into the cache buffer in place when ``past.*`` and ``present.*`` are bound
to the same memory (ORT IO binding), so a decode step reads the cache once and copies nothing.

The rewritten graph keeps the decoder contract's input and output names; what changes is how the
runtime must feed it (recorded in the manifest, see :data:`KV_SHARED`):

* ``past.{i}.{key,value}`` are buffers ``[batch, heads, capacity, head_dim]`` bound to the same memory
  as ``present.{i}.{key,value}``; row ``b``'s cache occupies positions ``[0, len_b)``
  (sequences are right-aligned to position 0, not left-padded);
* ``attention_mask`` ``[batch, total]`` holds ones at ``[0, len_b)`` for the row's length after this
  call and zeros after it; the graph derives GroupQueryAttention's ``seqlens_k`` and
  ``total_sequence_length`` from it;
* with ``notes["logits"] == "last"``, ``logits`` is ``[batch, 1, vocab]``: each row's newest position
  only (the LM head no longer runs over the whole prompt at prefill);
* with ``notes["kv_dtype"] == "int8"`` (int8 builds, :func:`quantize_kv_cache`), the ``past.*``/``present.*``
  buffers are int8 with per-channel scales inside the graph.

The plain exported graph stays in the bundle as the portable graph (TensorRT builds from it); the
rewritten one is an ORT "engine" of it, built once at export and saved with its checksum.

onnx + numpy only: no torch (``engines/`` never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import GraphName, past_name
from runtime.errors import Blip2Error, require
from runtime.manifest import KV_SHARED

ATTENTION_OP = "com.microsoft.GroupQueryAttention"
SHAPE_OPS = ("Reshape", "Transpose")


class PatternError(Blip2Error):
    """The graph's attention does not have the structure this rewrite understands."""


@dataclass(frozen=True)
class FuseResult:
    layers: int
    nodes_before: int
    nodes_after: int
    notes: dict


@dataclass(frozen=True)
class _Layer:
    q: str  # [B, S, heads*head_dim] before any scaling
    k: str
    v: str
    attn_out: str  # [B, S, heads*head_dim] tensor the output projection consumes
    scale: float
    dead: tuple[str, ...]  # node names replaced by the fused node (the present Concats)


class _Graph:
    def __init__(self, model):
        self.model = model
        g = model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in g.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """The value of constant ``name`` (read from disk for an external initializer), else None."""
        from onnx import numpy_helper

        from engines.tensor_store import tensor_array

        if name in self.inits:
            return tensor_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def has_const(self, name: str) -> bool:
        """Whether ``name`` is a constant (without reading its values)."""
        node = self.producer.get(name)
        return name in self.inits or (node is not None and node.op_type == "Constant")

    def const_size(self, name: str) -> int | None:
        """Element count of constant ``name`` from its dims (None when not a constant initializer)."""
        t = self.inits.get(name)
        return None if t is None else int(np.prod(t.dims)) if len(t.dims) else 1

    def scalar(self, node) -> float | None:
        """The scalar constant operand of a binary Mul/Div node, else None."""
        for x in node.input:
            if self.const_size(x) not in (None, 1):
                continue  # a weight: not worth reading
            c = self.const(x)
            if c is not None and c.size == 1:
                return float(c.reshape(()))
        return None

    def data_consumers(self, tensor: str) -> list:
        return [n for n in self.consumers.get(tensor, []) if n.op_type != "Shape"]

    def walk_up(self, tensor: str, allow_scale: bool) -> tuple[str, float]:
        """Follow ``tensor`` up through Reshape/Transpose (and scalar Mul/Div) to where it was computed."""
        scale = 1.0
        while True:
            node = self.producer.get(tensor)
            if node is None:
                return tensor, scale
            if node.op_type in SHAPE_OPS:
                tensor = node.input[0]
            elif allow_scale and node.op_type in ("Mul", "Div") and (s := self.scalar(node)) is not None:
                scale *= s if node.op_type == "Mul" else 1.0 / s
                tensor = next(x for x in node.input if not self.has_const(x))
            else:
                return tensor, scale

    def walk_down(self, tensor: str, stop: str, allow_scale: bool) -> tuple[Any, float, str]:
        """Follow single data consumers of ``tensor`` through shape ops (and scalar Mul/Div) to a ``stop`` op.

        Returns (that node, accumulated scale, the tensor it consumes)."""
        scale = 1.0
        while True:
            users = self.data_consumers(tensor)
            if len(users) != 1:
                raise PatternError(f"{tensor} has {len(users)} data consumers where one was expected")
            node = users[0]
            if node.op_type == stop:
                return node, scale, tensor
            if node.op_type in SHAPE_OPS:
                tensor = node.output[0]
            elif allow_scale and node.op_type in ("Mul", "Div") and (s := self.scalar(node)) is not None:
                scale *= s if node.op_type == "Mul" else 1.0 / s
                tensor = node.output[0]
            else:
                raise PatternError(f"unexpected {node.op_type} node {node.name!r} after {tensor}")


def _match_layer(g: _Graph, layer: int) -> _Layer:
    present_k, present_v = past_name(layer, "key", "present"), past_name(layer, "value", "present")
    concat_k, concat_v = g.producer.get(present_k), g.producer.get(present_v)
    for c, name in ((concat_k, present_k), (concat_v, present_v)):
        if c is None or c.op_type != "Concat" or len(c.input) != 2:
            raise PatternError(f"{name} is not produced by a two-input Concat of past and new states")
    k, _ = g.walk_up(concat_k.input[1], allow_scale=False)
    v, _ = g.walk_up(concat_v.input[1], allow_scale=False)
    # scores = (q * s_q) @ (present_key^T * s_k)
    score, k_scale, k_side = g.walk_down(present_k, "MatMul", allow_scale=True)
    if score.input[1] != k_side:
        raise PatternError(f"layer {layer}: the attention scores do not take the keys as their right operand")
    q, q_scale = g.walk_up(score.input[0], allow_scale=True)
    # probs @ present_value -> reshapes -> output projection
    pv, _, v_side = g.walk_down(present_v, "MatMul", allow_scale=False)
    if pv.input[1] != v_side:
        raise PatternError(f"layer {layer}: the attention output does not take the values as its right operand")
    tensor = pv.output[0]
    while True:
        users = g.data_consumers(tensor)
        if len(users) == 1 and users[0].op_type in SHAPE_OPS:
            tensor = users[0].output[0]
            continue
        break
    if not users:
        raise PatternError(f"layer {layer}: attention output {tensor} is unused")
    return _Layer(q, k, v, tensor, q_scale * k_scale, (concat_k.name, concat_v.name))


def fuse_decoder_attention(model, *, layers: int, heads: int, head_dim: int, kv_heads: int | None = None):
    """Rewrite ``model`` (an exported decoder ModelProto, changed in place) to GroupQueryAttention.

    ``heads``: query heads; ``kv_heads``: key/value heads (the cache's; default ``heads``).

    Returns a :class:`FuseResult`. Raises :class:`PatternError` when the graph does not match.
    """
    require("onnx", "export")
    from onnx import TensorProto, helper

    if head_dim % 8:
        raise PatternError(f"GroupQueryAttention needs head_dim to be a multiple of 8 (got {head_dim})")
    graph = model.graph
    before = len(graph.node)
    for n in graph.node:  # the exporter leaves some nodes unnamed; names identify the replaced ones
        if not n.name:
            n.name = f"{n.op_type}_{id(n)}"
    g = _Graph(model)
    matched = [_match_layer(g, i) for i in range(layers)]

    prefix = "/ort_gqa"
    mask = "attention_mask"
    new_nodes = [
        helper.make_node("Constant", [], [f"{prefix}/axes1"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", [mask, f"{prefix}/axes1"], [f"{prefix}/len"], keepdims=0),
        helper.make_node("Constant", [], [f"{prefix}/one"], value=helper.make_tensor("v", TensorProto.INT64, [], [1])),
        helper.make_node("Sub", [f"{prefix}/len", f"{prefix}/one"], [f"{prefix}/len_minus_1"]),
        helper.make_node("Cast", [f"{prefix}/len_minus_1"], [f"{prefix}/seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [mask], [f"{prefix}/mask_shape"]),
        helper.make_node("Gather", [f"{prefix}/mask_shape", f"{prefix}/one"], [f"{prefix}/total64"], axis=0),
        helper.make_node("Cast", [f"{prefix}/total64"], [f"{prefix}/total"], to=TensorProto.INT32),
    ]
    dead: set[str] = set()
    for i, lay in enumerate(matched):
        out = f"{prefix}/layers.{i}/output"
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [lay.q, lay.k, lay.v, past_name(i, "key"), past_name(i, "value"), f"{prefix}/seqlens_k", f"{prefix}/total"],
            [out, past_name(i, "key", "present"), past_name(i, "value", "present")],
            name=f"{prefix}/layers.{i}/GroupQueryAttention", domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads or heads, scale=float(lay.scale),
        ))
        for n in g.consumers.get(lay.attn_out, []):
            for j, x in enumerate(n.input):
                if x == lay.attn_out:
                    n.input[j] = out
        dead.update(lay.dead)

    kept = [n for n in graph.node if n.name not in dead]
    # insert the mask nodes first and each fused node right after the producer of its last input
    del graph.node[:]
    graph.node.extend(new_nodes[:8] + kept)
    _toposort_append(graph, new_nodes[8:])
    _prune(graph)
    del graph.value_info[:]  # stale shapes of removed tensors; ORT re-infers
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for i in range(layers):
        for kind in ("key", "value"):
            users = {n.op_type for n in graph.node if past_name(i, kind) in n.input}
            if users != {"GroupQueryAttention"}:
                raise PatternError(f"{past_name(i, kind)} is still used by {sorted(users)} after the rewrite")
    notes = {"attention": ATTENTION_OP, "kv_cache": KV_SHARED, "layers_fused": layers}
    return FuseResult(layers, before, len(graph.node), notes)


def _toposort_append(graph, extra) -> None:
    """Place each node of ``extra`` right after the last node producing one of its inputs."""
    nodes = list(graph.node)
    for node in extra:
        produced_at = {o: i for i, n in enumerate(nodes) for o in n.output}
        pos = max((produced_at[x] for x in node.input if x in produced_at), default=-1)
        nodes.insert(pos + 1, node)
    del graph.node[:]
    graph.node.extend(nodes)


def _prune(graph) -> None:
    """Drop nodes and initializers no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(x for x in n.input if x)
            for a in n.attribute:  # subgraphs (If/Loop) read outer names
                if a.g is not None and a.g.node:
                    for sn in a.g.node:
                        needed.update(sn.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def last_position_logits(model) -> bool:
    """Compute the LM head for one position per row instead of every position (engine protocol only).

    A step model only ever uses the logits of each row's newest token; at prefill that is row ``b``'s
    position ``len_b - 1`` (rows are aligned at 0), at a decode step the one new position. The LM head
    (hidden x vocab, the largest matmul of a small LLM) then runs on 1 position per row instead of the
    whole prompt, and ``logits`` becomes ``[batch, 1, vocab]``. Needs the mask nodes of
    :func:`fuse_decoder_attention`. Returns False (graph unchanged) when the head is not found.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    g = _Graph(model)
    node = g.producer.get("logits")
    while node is not None and node.op_type == "Cast":
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        return False
    weight = g.producer.get(node.input[1])  # a constant, or the int8 recipe's DequantizeLinear of one
    if not g.has_const(node.input[1]) and not (weight is not None and weight.op_type == "DequantizeLinear"
                                               and g.has_const(weight.input[0])):
        return False
    p = "/ort_last"
    states = node.input[0]
    new = [
        helper.make_node("Shape", [states], [f"{p}/shape"]),
        helper.make_node("Gather", [f"{p}/shape", "/ort_gqa/one"], [f"{p}/seq"], axis=0),
        helper.make_node("Sub", [f"{p}/seq", "/ort_gqa/one"], [f"{p}/seq_minus_1"]),
        helper.make_node("Min", ["/ort_gqa/len_minus_1", f"{p}/seq_minus_1"], [f"{p}/index"]),
        helper.make_node("Constant", [], [f"{p}/axes"], value=helper.make_tensor("v", TensorProto.INT64, [2], [1, 2])),
        helper.make_node("Unsqueeze", [f"{p}/index", f"{p}/axes"], [f"{p}/index3"]),
        helper.make_node("Constant", [], [f"{p}/ones2"], value=helper.make_tensor("v", TensorProto.INT64, [2], [1, 1])),
        helper.make_node("Constant", [], [f"{p}/from2"], value=helper.make_tensor("v", TensorProto.INT64, [1], [2])),
        helper.make_node("Constant", [], [f"{p}/to3"], value=helper.make_tensor("v", TensorProto.INT64, [1], [3])),
        helper.make_node("Slice", [f"{p}/shape", f"{p}/from2", f"{p}/to3"], [f"{p}/width"]),
        helper.make_node("Concat", [f"{p}/ones2", f"{p}/width"], [f"{p}/target"], axis=0),
        helper.make_node("Expand", [f"{p}/index3", f"{p}/target"], [f"{p}/index_b1d"]),
        helper.make_node("GatherElements", [states, f"{p}/index_b1d"], [f"{p}/last"], axis=1),
    ]
    node.input[0] = f"{p}/last"
    nodes = list(graph.node)
    at = nodes.index(node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + new + nodes[at:])
    return True


INT8_MODES = ("fold", "nbits")


def fold_int8_weights(model, writer=None) -> int:
    """Replace each ``DequantizeLinear`` of a constant int8 weight by its fp32 result, computed once.

    The weight-only int8 recipe dequantizes its weights in the graph, and ONNX Runtime's CPU provider
    keeps ``DequantizeLinear`` out of constant folding, so it would rebuild every fp32 weight at every
    step. Folding gives exactly the values the graph computes (int8 * scale, in fp32) without the
    per-step work; the step then reads fp32 weights. Returns the number of weights folded.
    ``writer`` (:class:`engines.tensor_store.DataWriter`): where each new weight goes as soon as it is made.
    """
    from engines.tensor_store import make_tensor

    graph = model.graph
    g = _Graph(model)
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
        _prune(graph)
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

    from engines.tensor_store import make_tensor

    graph = model.graph
    g = _Graph(model)
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
    _toposort_append(graph, adds)
    inits = [t for t in graph.initializer if t.name not in drop_inits] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(inits)
    _prune(graph)
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

    from engines.tensor_store import make_tensor

    graph = model.graph
    g = _Graph(model)
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
            bias_i = next((i for i, x in enumerate(add.input) if _const_source(g, x) is not None), None)
            if bias_i is None:
                break
            bias = _const(g, add.input[bias_i])
            mm = g.producer.get(add.input[1 - bias_i])
            if (bias is None or bias.ndim != 1 or mm is None or mm.op_type not in ("MatMul", "MatMulNBits")
                    or len(g.consumers.get(mm.output[0], [])) != 1):
                break
            if mm.op_type == "MatMulNBits" and len(mm.input) not in (3, 4):  # 3: int4, default zero points
                break
            weights = [_const(g, x) for x in mm.input[1:]]
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
        _toposort_append(graph, adds)
        _prune(graph)
    return packed


ROW_OPS = ("LayerNormalization", "MatMulNBits", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Erf",
           "Tanh", "Sigmoid")  # ops that act on each row of [..., hidden] alike, whatever the leading dims


def _const(g: _Graph, tensor: str) -> np.ndarray | None:
    """``g.const``, also through ``Identity`` nodes (the exporter shares equal weights that way)."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = g.producer.get(tensor)
    return g.const(tensor)


def _const_source(g: _Graph, tensor: str) -> str | None:
    """The constant ``tensor`` is (through ``Identity`` nodes), else None; nothing is read."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = g.producer.get(tensor)
    return tensor if g.has_const(tensor) else None


def _const_ndim(g: _Graph, tensor: str) -> int | None:
    """Rank of constant ``tensor`` from its declared dims (weights are not read), else None."""
    src = _const_source(g, tensor)
    if src is None:
        return None
    if src in g.inits:
        return len(g.inits[src].dims)
    c = g.const(src)  # a Constant node: small
    return None if c is None else c.ndim


def _shape_expr(g: _Graph, tensor: str) -> list | None:
    """A 1-D shape tensor as a list of ints and ``("dim", x, axis)`` items, or None when not understood."""
    c = g.const(tensor)
    if c is not None:
        return [int(v) for v in np.asarray(c).reshape(-1)]
    node = g.producer.get(tensor)
    if node is None:
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Concat":
        parts = [_shape_expr(g, x) for x in node.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    if node.op_type in ("Unsqueeze", "Squeeze"):
        inner = _shape_expr(g, node.input[0])
        return inner if inner is not None and len(inner) == 1 else None
    src = g.producer.get(node.input[0])
    if src is None or src.op_type != "Shape" or src.attribute:
        return None
    if node.op_type == "Gather" and ("axis" not in attrs or attrs["axis"].i == 0):
        idx = g.const(node.input[1])
        if idx is not None and idx.size == 1:
            return [("dim", src.input[0], int(idx.reshape(())))]
    if node.op_type == "Slice":
        args = [g.const(x) if x else None for x in node.input[1:]]
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 else None
        steps = args[3] if len(args) > 3 else None
        if (starts is not None and ends is not None and starts.tolist() == [-1] and ends.tolist()[0] >= 2**31
                and (axes is None or axes.tolist() == [0]) and (steps is None or steps.tolist() == [1])):
            return [("dim", src.input[0], -1)]
    return None


def drop_row_reshapes(model) -> int:
    """Remove each flatten-to-rows / restore pair of ``Reshape`` around row-wise work.

    OPT's decoder layers reshape ``[batch, seq, hidden]`` to ``[batch * seq, hidden]`` for the MLP and
    back afterwards; each pair costs ~17 small shape ops per layer (Shape, Gather, Unsqueeze, Concat),
    which at batch 1 is a measurable part of a decode step once the weights are int8. When everything
    between the two reshapes treats rows alike (LayerNorm over the last axis, matmuls with a constant
    weight, bias adds, activations), both reshapes are identities on the values and are dropped.
    Returns the number of pairs removed.
    """
    graph = model.graph
    removed = 0
    outputs = {o.name for o in graph.output}
    reshaped: set[str] = set()  # tensors that were [rows, hidden] and are now [batch, seq, hidden]
    g = _Graph(model)
    for name in [n.name for n in graph.node if n.op_type == "Reshape"]:
        r1 = next((n for n in g.producer.values() if n.name == name), None)
        if r1 is None:
            continue  # removed with an earlier pair
        x = r1.input[0]
        if _shape_expr(g, r1.input[1]) != [-1, ("dim", x, -1)]:
            continue
        region, ends, accepted, ok = {r1.output[0]}, [], set(), True
        grew = True
        while grew and ok:  # grow the region until it stops; a node joins once all its data inputs are in it
            grew = False
            for n in [n for t in list(region) for n in g.consumers.get(t, [])]:
                if n.name in accepted:
                    continue
                if n.op_type == "Reshape" and n.input[0] in region:
                    expr = _shape_expr(g, n.input[1])
                    ok = ok and bool(expr) and expr == [("dim", x, i) for i in range(len(expr or []))]
                    ends.append(n)
                    accepted.add(n.name)
                    continue
                data = [i for i in n.input if i and _const_source(g, i) is None]
                if n.op_type not in ROW_OPS or not all(i in region for i in data[:1]):
                    ok = False
                    break
                if not all(i in region for i in data):
                    continue  # an input is still outside: wait for it (the residual add of the MLP's output)
                if n.op_type == "LayerNormalization":
                    ok = next((a.i for a in n.attribute if a.name == "axis"), -1) == -1
                elif n.op_type == "MatMul":
                    ok = _const_ndim(g, n.input[1]) == 2
                elif n.op_type != "MatMulNBits":
                    ok = all(i in region or (_const_ndim(g, i) or 0) <= 1 for i in n.input if i)
                if not ok or any(o in outputs for o in n.output):
                    ok = False
                    break
                accepted.add(n.name)
                region.update(n.output)
                grew = True
        consumers = {n.name for t in region for n in g.consumers.get(t, [])}
        ok = ok and consumers <= accepted
        if not ok or not ends:
            continue
        rename = {r1.output[0]: x, **{r2.output[0]: r2.input[0] for r2 in ends}}
        drop = {r1.name, *(r2.name for r2 in ends)}
        kept = [n for n in graph.node if n.name not in drop]
        for n in kept:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
        del graph.node[:]
        graph.node.extend(kept)
        reshaped |= region
        removed += 1
        g = _Graph(model)  # the graph changed: index it again
    if removed:
        info = [v for v in graph.value_info if v.name not in reshaped]  # their recorded 2-D shapes no longer hold
        del graph.value_info[:]
        graph.value_info.extend(info)
        _prune(graph)
    return removed


def uint8_activations(model) -> int:
    """Re-express each symmetric int8 activation ``QuantizeLinear -> DequantizeLinear`` pair as uint8
    with zero point 128.

    The integers are the same ones shifted by 128 (``saturate(round(x / s)) + 128``), so every value the
    graph computes is unchanged. What changes is the kernel ONNX Runtime picks: on x86 its int8 GEMMs
    (``QLinearMatMul`` / ``MatMulIntegerToFloat``, fused from the Q/DQ pattern) have VNNI kernels for
    uint8 activations x int8 weights only; with int8 activations it falls back to a path about 20x
    slower and leaves many weight ``DequantizeLinear`` unfused (rebuilding fp32 weights every run).
    TensorRT wants symmetric int8 (zero point 0), which is why the portable graph keeps it.
    Returns the number of pairs rewritten.
    """
    from onnx import numpy_helper

    graph = model.graph
    g = _Graph(model)
    zero_points: dict[tuple[int, ...], str] = {}
    rewritten: set[str] = set()

    def int8_zero(node) -> tuple[int, ...] | None:
        z = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return tuple(z.shape) if z is not None and z.dtype == np.int8 and not z.any() else None

    def u8_zero(shape: tuple[int, ...]) -> str:
        if shape not in zero_points:
            name = f"__uint8_zero_point_{len(zero_points)}"
            graph.initializer.append(numpy_helper.from_array(np.full(shape, 128, np.uint8), name))
            zero_points[shape] = name
        return zero_points[shape]

    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if q.input[0] in g.inits or (shape := int8_zero(q)) is None:
            continue
        users = g.consumers.get(q.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" or u.input[0] != q.output[0] or int8_zero(u) is None
                            for u in users) or any(o.name == q.output[0] for o in graph.output):
            continue
        q.input[2] = u8_zero(shape)
        for u in users:
            u.input[2] = u8_zero(int8_zero(u) or shape)
        rewritten.add(q.output[0])
    if rewritten:  # shapes inferred at export recorded these tensors as int8
        info = [v for v in graph.value_info if v.name not in rewritten]
        del graph.value_info[:]
        graph.value_info.extend(info)
        _prune(graph)
    return len(rewritten)


KV_INT8_MARGIN = 1.0  # int8 KV scales cover this multiple of the largest |key|/|value| calibration saw


def kv_cache_scales(peaks: dict[str, np.ndarray], layers: int, *,
                    margin: float = KV_INT8_MARGIN) -> dict[str, np.ndarray]:
    """Per-channel int8 scales for each layer's cached keys and values.

    ``peaks``: ``{past.{i}.{key,value}: [heads, head_dim]}``, the largest magnitude calibration saw per
    head and channel (``engines.calibration.CalibrationSet.kv_peak``). Each scale covers ``margin``
    times it: keys carry a few large channels, and one scale per tensor would spend the 8 bits on them.
    Returns ``{past name: [heads, 1, head_dim]}`` float32, the layout ``GroupQueryAttention`` takes for
    ``PER_CHANNEL``. Raises when a layer was never seen (nothing to set its scales from).
    """
    need = [past_name(i, k) for i in range(layers) for k in ("key", "value")]
    missing = [n for n in need if n not in peaks]
    if missing:
        raise Blip2Error(f"calibration saw no cached keys/values for {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}: the int8 KV cache has nothing to set its scales "
                         f"from", hint="build with --ort-kv-cache fp32")
    top = max(float(peaks[n].max()) for n in need)
    floor = max(top * 1e-6, 1e-8)  # a channel that stayed at 0 still gets a usable scale
    return {n: (np.maximum(peaks[n], floor) * margin / 127.0).astype(np.float32)[:, None, :] for n in need}


def quantize_kv_cache(model, scales: dict[str, np.ndarray]) -> int:
    """Store the fused decoder's KV cache in int8: ``past.*``/``present.*`` become int8 tensors, and each
    ``GroupQueryAttention`` gets ``kv_cache_bit_width=8`` with per-channel ``k_scale``/``v_scale``
    (``scales`` from :func:`kv_cache_scales`). The kernel quantizes each new key/value as it writes it
    into the cache (rounding, saturating at +-127 * scale) and dequantizes what it reads; queries,
    attention output and everything else stay fp32. A decode step then reads a quarter of the cache
    bytes. Returns the number of layers converted; raises :class:`PatternError` when a layer's
    attention is not a fused node reading ``past.*``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    done = 0
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        k_name, v_name = (gqa.input[3], gqa.input[4]) if len(gqa.input) > 4 else ("", "")
        if k_name not in scales or v_name not in scales:
            raise PatternError(f"{gqa.name}: its cache inputs {k_name!r}, {v_name!r} have no int8 scales")
        inputs = list(gqa.input) + [""] * max(0, 12 - len(gqa.input))
        if any(inputs[12:]):
            raise PatternError(f"{gqa.name} already has inputs past index 11")
        ks, vs = f"{gqa.name}/k_scale", f"{gqa.name}/v_scale"
        graph.initializer.extend([numpy_helper.from_array(scales[k_name], ks),
                                  numpy_helper.from_array(scales[v_name], vs)])
        del gqa.input[:]
        gqa.input.extend(inputs[:12] + [ks, vs])
        gqa.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                              helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                              helper.make_attribute("v_quant_type", "PER_CHANNEL")])
        done += 1
    for v in (*graph.input, *graph.output):
        if v.name.startswith(("past.", "present.")):
            v.type.tensor_type.elem_type = TensorProto.INT8
    return done


def build_decoder_engine(src: str | Path, dst: str | Path, *, layers: int, heads: int, head_dim: int,
                         kv_heads: int | None = None,
                         int8: str = "nbits", kv_scales: dict[str, np.ndarray] | None = None
                         ) -> tuple[list[str], dict]:
    """Read the exported decoder at ``src``, fuse its attention, write the ORT engine graph at ``dst``.

    With ``kv_scales`` (:func:`kv_cache_scales`) the engine keeps its KV cache in int8
    (:func:`quantize_kv_cache`; ``notes["kv_dtype"]`` says so), else in the graph's float type.

    Weights stream (:mod:`engines.tensor_store`): the graph is read without them, new weights go to the
    engine's data file as they are made, and weights the engine keeps unchanged stay in ``src``'s data
    file when it lies beside ``dst`` (stored once). Returns (external data files the engine refers to,
    notes for the manifest). Written through a temporary name, so ``dst`` is never half-written.
    """
    _check_int8_mode(int8)
    with _StreamedEngine(src, dst) as e:
        result = fuse_decoder_attention(e.model, layers=layers, heads=heads, head_dim=head_dim, kv_heads=kv_heads)
        last = last_position_logits(e.model)
        int8_notes = _engine_int8_weights(e.model, int8, e.writer)
        reshapes = drop_row_reshapes(e.model)
        packed = pack_qkv(e.model, e.writer)
        kv_notes: dict[str, Any] = {}
        if kv_scales is not None:
            kv_notes = {"kv_dtype": "int8", "kv_quant": {"scales": "per channel, static (calibration)",
                                                         "margin": KV_INT8_MARGIN,
                                                         "layers": quantize_kv_cache(e.model, kv_scales)}}
        nodes_after = len(e.model.graph.node)
        ext = e.save()
    notes = dict(result.notes, nodes_before=result.nodes_before, nodes_after=nodes_after,
                 logits="last" if last else "all", row_reshapes_dropped=reshapes,
                 qkv_packed=packed, **int8_notes, **kv_notes)
    return ext, notes


class _StreamedEngine:
    """A graph read without its weights (``src``) on its way to an engine file (``dst``)."""

    def __init__(self, src: str | Path, dst: str | Path):
        from engines.onnx_utils import EXTERNAL_DATA_THRESHOLD
        from engines.tensor_store import external_info, is_external, load_lazy, new_writer, weight_bytes

        self.dst = Path(dst)
        self.model = load_lazy(src)
        here = self.dst.parent.resolve()
        self.share = tuple(sorted({external_info(t)["location"] for t in self.model.graph.initializer
                                   if is_external(t) and Path(external_info(t)["location"]).parent == here}))
        self.threshold = EXTERNAL_DATA_THRESHOLD
        # external when large, or when the source graph's weights are external (then shared, not copied)
        self.writer = new_writer(self.dst) if self.share or weight_bytes(self.model) > self.threshold else None

    def save(self) -> list[str]:
        from engines.tensor_store import save_streaming

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
    """Lower (``"nbits"``) and/or fold the weight-only int8 layers of ``model``, and lower its int4 blocks
    (:func:`engines.int4.lower_int4_weights`); return the manifest notes saying what was done (empty when
    the graph has no int8 or int4 weights). ``writer``: where new weights go as they are made."""
    from engines.int4 import NBITS_ACCURACY_LEVEL as INT4_ACCURACY_LEVEL
    from engines.int4 import lower_int4_weights

    lowered4 = lower_int4_weights(model, writer=writer)  # int4 blocks (int4 builds) always run as MatMulNBits bits=4
    lowered = lower_int8_weights(model, writer=writer) if int8 == "nbits" else 0
    folded = fold_int8_weights(model, writer)
    notes: dict[str, Any] = {}
    if lowered4:
        notes["int4_matmul"] = {"op": "com.microsoft.MatMulNBits", "bits": 4, "layers": lowered4,
                                "accuracy_level": INT4_ACCURACY_LEVEL,
                                "activations": "int8 per weight block, quantized at run time"}
    if lowered:
        notes["int8_matmul"] = {"op": "com.microsoft.MatMulNBits", "bits": 8,
                                "accuracy_level": NBITS_ACCURACY_LEVEL, "block_size": NBITS_BLOCK,
                                "layers": lowered,
                                "activations": f"int8 per block of {NBITS_BLOCK} inputs, quantized at run time"}
    if folded:
        notes["int8_weights_folded"] = folded  # DequantizeLinear computed once: fp32 weights, same values
    return notes


def build_qdq_engine(src: str | Path, dst: str | Path) -> tuple[list[str], dict]:
    """ORT build of a calibrated (static Q/DQ) int8 graph: its activation pairs in uint8 (see
    :func:`uint8_activations`), everything else as in the portable graph. Raises :class:`PatternError`
    when the graph has no int8 activation pair to rewrite. Returns (external data files, notes)."""
    with _StreamedEngine(src, dst) as e:
        pairs = uint8_activations(e.model)
        if not pairs:
            raise PatternError(f"{Path(src).name} has no symmetric int8 activation QuantizeLinear to rewrite")
        ext = e.save()
    return ext, {"activations": "uint8, zero point 128 (the graph's symmetric int8 values, shifted)",
                 "activation_pairs": pairs}


def build_weights_engine(src: str | Path, dst: str | Path, *, int8: str = "nbits") -> tuple[list[str], dict]:
    """ORT build of a weight-only int8 graph that keeps its IO (the T5 encoder, cross-attention K/V and
    decoder): its int8 layers as ``MatMulNBits`` (``int8="nbits"``) or dequantized once (``"fold"``), so
    no step rebuilds fp32 weights. Raises :class:`PatternError` when there is nothing to rewrite."""
    _check_int8_mode(int8)
    with _StreamedEngine(src, dst) as e:
        notes = _engine_int8_weights(e.model, int8, e.writer)
        if not notes:
            raise PatternError(f"{Path(src).name} has no int8 weights to lower or fold")
        ext = e.save()
    return ext, notes


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

    from runtime.manifest import EngineRecord, file_record

    kind = wants_engine(record)
    if kind is None:
        return record
    bundle_dir = Path(bundle_dir)
    stem = record.file.removesuffix(".onnx")
    dst = f"{stem}.ort.onnx"
    m = model_facts
    try:
        if kind == "decoder":
            ext, notes = build_decoder_engine(bundle_dir / record.file, bundle_dir / dst, layers=m.llm_layers,
                                              heads=m.query_heads, kv_heads=m.llm_heads, head_dim=m.head_dim, int8=int8,
                                              kv_scales=kv_scales)
        elif kind == "weights":
            ext, notes = build_weights_engine(bundle_dir / record.file, bundle_dir / dst, int8=int8)
        else:
            ext, notes = build_qdq_engine(bundle_dir / record.file, bundle_dir / dst)
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

    from runtime.integrity import atomic_write_text
    from runtime.manifest import MANIFEST_NAME, load_manifest

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
