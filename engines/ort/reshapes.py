"""Drop the flatten/restore ``Reshape`` pairs around row-wise regions (the MLP), and their shape ops."""

from __future__ import annotations

from engines.ort.graph import (
    GraphView,
    const_ndim,
    const_source,
    prune,
    shape_expr,
)

ROW_OPS = ("LayerNormalization", "MatMulNBits", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Erf",
           "Tanh", "Sigmoid")  # ops that act on each row of [..., hidden] alike, whatever the leading dims




def _dq_weight(g, tensor: str) -> bool:
    """``tensor`` is a 2-D weight behind ``DequantizeLinear`` of a constant (int8, int4)."""
    dq = g.producer.get(tensor)
    return dq is not None and dq.op_type == "DequantizeLinear" and const_ndim(g, dq.input[0]) == 2


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
    g = GraphView(model)
    for name in [n.name for n in graph.node if n.op_type == "Reshape"]:
        r1 = next((n for n in g.producer.values() if n.name == name), None)
        if r1 is None:
            continue  # removed with an earlier pair
        x = r1.input[0]
        if shape_expr(g, r1.input[1]) != [-1, ("dim", x, -1)]:
            continue
        region, ends, accepted, ok = {r1.output[0]}, [], set(), True
        grew = True
        while grew and ok:  # grow the region until it stops; a node joins once all its data inputs are in it
            grew = False
            for n in [n for t in list(region) for n in g.consumers.get(t, [])]:
                if n.name in accepted:
                    continue
                if n.op_type == "Reshape" and n.input[0] in region:
                    expr = shape_expr(g, n.input[1])
                    ok = ok and bool(expr) and expr == [("dim", x, i) for i in range(len(expr or []))]
                    ends.append(n)
                    accepted.add(n.name)
                    continue
                data = [i for i in n.input if i and const_source(g, i) is None and not _dq_weight(g, i)]
                if n.op_type not in ROW_OPS or not all(i in region for i in data[:1]):
                    ok = False
                    break
                if not all(i in region for i in data):
                    continue  # an input is still outside: wait for it (the residual add of the MLP's output)
                if n.op_type == "LayerNormalization":
                    ok = next((a.i for a in n.attribute if a.name == "axis"), -1) == -1
                elif n.op_type == "MatMul":  # a constant weight, or one behind DequantizeLinear (int8, int4)
                    ok = const_ndim(g, n.input[1]) == 2 or _dq_weight(g, n.input[1])
                elif n.op_type != "MatMulNBits":
                    ok = all(i in region or (const_ndim(g, i) or 0) <= 1 for i in n.input if i)
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
        g = GraphView(model)  # the graph changed: index it again
    if removed:
        info = [v for v in graph.value_info if v.name not in reshaped]  # their recorded 2-D shapes no longer hold
        del graph.value_info[:]
        graph.value_info.extend(info)
        prune(graph)
    return removed
