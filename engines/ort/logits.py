"""LM head on each row's newest position only (prefill computes one logits row per sequence)."""

from __future__ import annotations

from engines.ort.attention import GQA_LAST_INDEX, GQA_ONE
from engines.ort.graph import GraphView


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
    g = GraphView(model)
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
        helper.make_node("Gather", [f"{p}/shape", GQA_ONE], [f"{p}/seq"], axis=0),
        helper.make_node("Sub", [f"{p}/seq", GQA_ONE], [f"{p}/seq_minus_1"]),
        helper.make_node("Min", [GQA_LAST_INDEX, f"{p}/seq_minus_1"], [f"{p}/index"]),
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
