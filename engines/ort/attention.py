"""Fused attention: each decoder layer's attention subgraph becomes one ``com.microsoft.GroupQueryAttention``
that updates a shared KV cache buffer in place."""

from __future__ import annotations

from dataclasses import dataclass

from engines.ort.graph import SHAPE_OPS, GraphView, PatternError, prune, toposort_append
from runtime.contract import past_name
from runtime.errors import require
from runtime.manifest import KV_SHARED

ATTENTION_OP = "com.microsoft.GroupQueryAttention"
# Tensors the fused graph computes once from attention_mask, which later passes use too:
GQA_PREFIX = "/ort_gqa"
GQA_ONE = f"{GQA_PREFIX}/one"  # int64 scalar 1
GQA_LAST_INDEX = f"{GQA_PREFIX}/len_minus_1"  # [batch] int64: each row's newest position


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


def _match_layer(g: GraphView, layer: int) -> _Layer:
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
    g = GraphView(model)
    matched = [_match_layer(g, i) for i in range(layers)]

    prefix = GQA_PREFIX  # (GQA_ONE and GQA_LAST_INDEX below are read by engines.ort.logits)
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
    toposort_append(graph, new_nodes[8:])
    prune(graph)
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
