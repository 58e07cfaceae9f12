"""Calibrated int8 activations as uint8 (zero point 128): the same integers, on ORT's fast u8 x s8 kernels."""

from __future__ import annotations

import numpy as np

from engines.ort.graph import GraphView, prune


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
    g = GraphView(model)
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
        prune(graph)
    return len(rewritten)
