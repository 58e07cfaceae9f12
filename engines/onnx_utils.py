"""Small ONNX graph helpers shared by the precision transforms (onnx + numpy only, no torch)."""

from __future__ import annotations

from pathlib import Path

from engines.tensor_store import save_streaming
from runtime.errors import Blip2Error

# Graphs whose weights exceed this go to one external data file (protobuf cannot hold more than 2 GiB;
# written and read one tensor at a time, see engines/tensor_store.py, where inline weights are held whole).
EXTERNAL_DATA_THRESHOLD = 64 << 20


def load_model(path: str | Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model_atomic(model, path: Path, *, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Write ``model`` to ``path`` (and ``path.data`` when large) so that neither appears half-written.

    The data file is written under a temporary name and renamed into place first, the graph last
    (:func:`engines.tensor_store.save_streaming`): a model read lazily keeps its weights on disk until
    they are copied, one tensor at a time. Returns the external data file names (relative to the folder).
    """

    return save_streaming(model, Path(path), external_threshold=external_threshold)


def ensure_node_names(model) -> None:
    """Give every unnamed node a unique name (block lists and quantizer exclusions are by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def producer_through(model, tensor: str, skip: tuple[str, ...] = ()):
    """The node computing ``tensor``, looking through ops in ``skip`` (Casts, reshapes); None for inputs."""
    prod = producers(model)
    node = prod.get(tensor)
    while node is not None and node.op_type in skip and node.input and node.input[0] in prod:
        node = prod[node.input[0]]
    return node


def toposort(model) -> None:
    """Sort ``model.graph.node`` topologically (ONNX requires it, TensorRT's parser relies on it).

    Kahn's algorithm preferring the original order, so an already sorted graph is left as it was.
    Subgraph-free graphs only (the exported BLIP-2 graphs have no If/Loop bodies).
    """
    import heapq

    graph = model.graph
    nodes = list(graph.node)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    deps = []
    consumers: dict[str, list[int]] = {}
    for idx, n in enumerate(nodes):
        need = {i for i in n.input if i not in known}
        deps.append(len(need))
        for i in need:
            consumers.setdefault(i, []).append(idx)
    heap = [i for i, d in enumerate(deps) if d == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        idx = heapq.heappop(heap)
        order.append(nodes[idx])
        for out in nodes[idx].output:
            for c in consumers.pop(out, []):
                deps[c] -= 1
                if deps[c] == 0:
                    heapq.heappush(heap, c)
    if len(order) != len(nodes):

        raise Blip2Error(f"graph {graph.name!r} has a cycle or a dangling input ({len(nodes) - len(order)} "
                         "nodes cannot be ordered)")
    del graph.node[:]
    graph.node.extend(order)


def fresh_name(taken: set[str], stem: str, suffix: str) -> str:
    """``stem + suffix``, or its ``.b`` twin when the live manifest already uses that name.

    A build writes its new files under names the current manifest does not vouch for, so moving them
    into the bundle never overwrites a file a reader may be checking; the manifest swap then makes
    them count, and the previous files are deleted afterwards. The two names alternate across builds.
    """
    for cand in (f"{stem}{suffix}", f"{stem}.b{suffix}"):
        if cand not in taken and f"{cand}.data" not in taken:
            return cand
    raise AssertionError(f"both {stem}{suffix} and its twin are in use")  # a manifest names one graph file


def gemm_as_matmul(node, w: str, nodes, new_nodes: list) -> bool:
    """Turn ``Gemm(x, W, bias, transB=1)`` into ``MatMul(x, W^T)`` (+ ``Add(bias)``), in place; False (and
    nothing changed) when the Gemm scales its terms or ``W`` is read by another node; the caller stores
    ``W`` transposed. Quantized weights behind a MatMul are what ONNX Runtime fuses (int4, since 1.19;
    ``-> Gemm`` only in recent versions) and what the engine's row-wise passes take ([batch, seq, K] in)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return False
    if sum(list(n.input).count(w) for n in nodes) != 1:
        return False
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    node.op_type = "MatMul"
    del node.attribute[:]
    del node.input[2:]
    if bias is not None:
        node.output[0] = out + "__nobias"
        new_nodes.append(helper.make_node("Add", [node.output[0], bias], [out], name=node.name + "__bias"))
    return True


def cpu_session(path: str | Path, *, level: str = "all"):
    """An ONNX Runtime CPU session of the graph at ``path`` for the build's own runs (calibration,
    checks): quiet, and with one copy of the weights (no repacked second copy for the GEMM kernels).
    ``level``: graph optimizations, "all", "basic" or "none" (the tensors as exported)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def probe_session(model, tensors, folder: str | Path, *, level: str = "all"):
    """A :func:`cpu_session` of ``model`` (read by ``load_lazy``) with ``tensors`` added to its outputs,
    saved in ``folder``: a :class:`engines.tensor_store.LinkedFolder` of the graph it was read from, so
    ONNX Runtime reads the weights by path, once. ``model`` itself is not changed."""
    import onnx
    from onnx import TensorProto, helper

    from engines.tensor_store import point_at_links

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    path = Path(folder) / "probe.onnx"
    onnx.save_model(point_at_links(probe), str(path))
    del probe
    return cpu_session(path, level=level)
