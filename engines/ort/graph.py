"""A light view of an ONNX graph (producers, consumers, initializers, constants) and the helpers every
ORT engine pass shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.tensor_store import tensor_array
from runtime.errors import Blip2Error

SHAPE_OPS = ("Reshape", "Transpose")


class PatternError(Blip2Error):
    """The graph's attention does not have the structure this rewrite understands."""


class GraphView:
    """Producers, consumers and initializers of a graph, indexed once; passes keep it in step as they edit."""

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


def toposort_append(graph, extra) -> None:
    """Place each node of ``extra`` right after the last node producing one of its inputs."""
    nodes = list(graph.node)
    for node in extra:
        produced_at = {o: i for i, n in enumerate(nodes) for o in n.output}
        pos = max((produced_at[x] for x in node.input if x in produced_at), default=-1)
        nodes.insert(pos + 1, node)
    del graph.node[:]
    graph.node.extend(nodes)


def prune(graph) -> None:
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


def const_value(g: GraphView, tensor: str) -> np.ndarray | None:
    """``g.const``, also through ``Identity`` nodes (the exporter shares equal weights that way)."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = g.producer.get(tensor)
    return g.const(tensor)


def const_source(g: GraphView, tensor: str) -> str | None:
    """The constant ``tensor`` is (through ``Identity`` nodes), else None; nothing is read."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = g.producer.get(tensor)
    return tensor if g.has_const(tensor) else None


def const_ndim(g: GraphView, tensor: str) -> int | None:
    """Rank of constant ``tensor`` from its declared dims (weights are not read), else None."""
    src = const_source(g, tensor)
    if src is None:
        return None
    if src in g.inits:
        return len(g.inits[src].dims)
    c = g.const(src)  # a Constant node: small
    return None if c is None else c.ndim


def shape_expr(g: GraphView, tensor: str) -> list | None:
    """A 1-D shape tensor as a list of ints and ``("dim", x, axis)`` items, or None when not understood."""
    c = g.const(tensor)
    if c is not None:
        return [int(v) for v in np.asarray(c).reshape(-1)]
    node = g.producer.get(tensor)
    if node is None:
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Concat":
        parts = [shape_expr(g, x) for x in node.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    if node.op_type in ("Unsqueeze", "Squeeze"):
        inner = shape_expr(g, node.input[0])
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
