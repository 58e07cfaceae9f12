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
  only (the LM head no longer runs over the whole prompt at prefill).

The plain exported graph stays in the bundle as the portable graph (TensorRT builds from it); the
rewritten one is an ORT "engine" of it, built once at export and saved with its checksum.

onnx + numpy only: no torch (``engines/`` never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import past_name
from runtime.errors import Blip2Error, require

KV_SHARED = "shared_buffer"  # manifest notes value: past/present share one preallocated buffer
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
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, node) -> float | None:
        """The scalar constant operand of a binary Mul/Div node, else None."""
        for x in node.input:
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
                tensor = next(x for x in node.input if self.const(x) is None)
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


def fuse_decoder_attention(model, *, layers: int, heads: int, head_dim: int):
    """Rewrite ``model`` (an exported decoder ModelProto, changed in place) to GroupQueryAttention.

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
            num_heads=heads, kv_num_heads=heads, scale=float(lay.scale),
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
    if node is None or node.op_type != "MatMul" or g.const(node.input[1]) is None:
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


def fold_int8_weights(model) -> int:
    """Replace each ``DequantizeLinear`` of a constant int8 weight by its fp32 result, computed once.

    The weight-only int8 recipe dequantizes its weights in the graph, and ONNX Runtime's CPU provider
    keeps ``DequantizeLinear`` out of constant folding, so it would rebuild every fp32 weight at every
    step. Folding gives exactly the values the graph computes (int8 * scale, in fp32) without the
    per-step work; the step then reads fp32 weights. Returns the number of weights folded.
    """
    from onnx import numpy_helper

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
        new_inits.append(numpy_helper.from_array(w.astype(np.float32), dq.output[0]))
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


def lower_int8_weights(model) -> int:
    """Replace ``DequantizeLinear(int8 weight) -> MatMul/Gemm`` by ``com.microsoft.MatMulNBits`` (8 bits).

    Opt-in (``int8="nbits"``): MatMulNBits reads the int8 bytes directly (half the memory traffic of
    fp32 per step), but its fast CPU kernel (``accuracy_level`` 4) also quantizes the activations per
    block at run time: W8A8 rather than the recipe's weight-only int8. Check parity before using it
    (on the tiny test model it drops token agreement below the int8 threshold). Symmetric per-channel
    weights map exactly (uint8 with zero point 128, the channel's scale repeated over its blocks).
    Returns the number of layers lowered; anything else is left alone.
    """
    from onnx import helper, numpy_helper

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
        block = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
        if block is None:
            continue
        blocks = k // block
        name = dq.input[0] + "__nbits"
        packed = (w_nk.astype(np.int16) + 128).astype(np.uint8).reshape(n_out, blocks, block)
        new_inits += [numpy_helper.from_array(packed, name),
                      numpy_helper.from_array(np.repeat(scale.astype(np.float32).reshape(-1), blocks), name + "_scales"),
                      numpy_helper.from_array(np.full(n_out * blocks, 128, np.uint8), name + "_zero_points")]
        out = mm.output[0] if bias is None else mm.output[0] + "__nobias"
        adds.append(helper.make_node("MatMulNBits", [mm.input[0], name, name + "_scales", name + "_zero_points"],
                                     [out], name=mm.name + "__nbits", domain="com.microsoft", K=k, N=n_out, bits=8,
                                     block_size=block, accuracy_level=4))
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


def build_decoder_engine(src: str | Path, dst: str | Path, *, layers: int, heads: int, head_dim: int,
                         int8: str = "fold") -> tuple[list[str], dict]:
    """Read the exported decoder at ``src``, fuse its attention, write the ORT engine graph at ``dst``.

    Returns (external data files written beside ``dst``, notes for the manifest). Written through a
    temporary name, so ``dst`` is never half-written.
    """
    from engines.onnx_utils import load_model, save_model_atomic

    model = load_model(src)
    result = fuse_decoder_attention(model, layers=layers, heads=heads, head_dim=head_dim)
    if int8 not in INT8_MODES:
        raise Blip2Error(f"unknown int8 engine mode {int8!r}; choose one of: {', '.join(INT8_MODES)}")
    lowered = lower_int8_weights(model) if int8 == "nbits" else 0
    folded = fold_int8_weights(model)
    last = last_position_logits(model)
    ext = save_model_atomic(model, Path(dst))
    notes = dict(result.notes, nodes_before=result.nodes_before, nodes_after=len(model.graph.node),
                 logits="last" if last else "all")
    if lowered:
        notes["int8_matmul"] = {"op": "com.microsoft.MatMulNBits", "bits": 8, "accuracy_level": 4,
                                "layers": lowered, "activations": "quantized per block at run time"}
    if folded:
        notes["int8_weights_folded"] = folded  # DequantizeLinear computed once: fp32 weights, same values
    return ext, notes


def engine_record_fields() -> dict:
    """The backend/device fields of a manifest ``EngineRecord`` for an ORT CPU build."""
    ort = require("onnxruntime", "cpu")
    return {"backend": "ort", "device_name": "cpu", "compute_capability": "", "backend_version": ort.__version__}


def attach_ort_engine(bundle_dir: str | Path, record, model_facts, *, warn=None, int8: str = "fold"):
    """Build the ORT engine of decoder ``record`` inside ``bundle_dir``; return the record with it attached.

    The engine is listed in ``record.engines`` (file + sha256, checked like every bundle file) and
    described in ``record.notes["ort_engine"]``, which tells the runtime how to feed it. When the graph
    does not match the rewrite, ``record`` is returned unchanged (the portable graph still runs) and
    ``warn`` (if given) receives the reason.
    """
    import dataclasses

    from runtime.manifest import EngineRecord, file_record

    bundle_dir = Path(bundle_dir)
    stem = record.file.removesuffix(".onnx")
    dst = f"{stem}.ort.onnx"
    m = model_facts
    try:
        ext, notes = build_decoder_engine(bundle_dir / record.file, bundle_dir / dst, layers=m.llm_layers,
                                          heads=m.llm_heads, head_dim=m.head_dim, int8=int8)
    except PatternError as e:
        if warn is not None:
            warn(f"no ORT engine for {record.file}: {e}")
        return record
    fields = engine_record_fields()
    engines = []
    for name in (dst, *ext):
        fr = file_record(bundle_dir, name)
        engines.append(EngineRecord(file=name, sha256=fr.sha256, **fields))
    notes = dict(notes, file=dst, external_data=list(ext))
    return dataclasses.replace(record, engines=tuple(record.engines) + tuple(engines),
                               notes={**record.notes, "ort_engine": notes})


def add_ort_engines(bundle: str | Path, precisions: tuple[str, ...] | None = None, *, force: bool = False,
                    warn=None, int8: str = "fold") -> list[str]:
    """Build ORT engines for the decoder graphs of an existing bundle that lack one; rewrite its manifest.

    For bundles exported without the engine, or precisions added later by ``blip2-export build``.
    Returns the precisions that gained an engine. The manifest is replaced atomically, last.
    """
    import dataclasses

    from runtime.contract import GraphName
    from runtime.integrity import atomic_write_text
    from runtime.manifest import MANIFEST_NAME, load_manifest

    bundle = Path(bundle)
    m = load_manifest(bundle)
    graphs = {p: dict(gs) for p, gs in m.graphs.items()}
    done = []
    for prec, gs in graphs.items():
        rec = gs.get(GraphName.DECODER.value)
        if rec is None or (precisions is not None and prec not in precisions):
            continue
        if "ort_engine" in rec.notes:
            if not force:
                continue
            old = {rec.notes["ort_engine"].get("file"), *rec.notes["ort_engine"].get("external_data", [])}
            rec = dataclasses.replace(rec, engines=tuple(e for e in rec.engines if e.file not in old),
                                      notes={k: v for k, v in rec.notes.items() if k != "ort_engine"})
            gs[GraphName.DECODER.value] = rec
        new = attach_ort_engine(bundle, rec, m.model, warn=warn, int8=int8)
        if new is not rec:
            gs[GraphName.DECODER.value] = new
            done.append(prec)
    if done or force:
        atomic_write_text(bundle / MANIFEST_NAME, dataclasses.replace(m, graphs=graphs).dumps())
        (bundle / MANIFEST_NAME).chmod(0o644)  # a bundle is meant to be shared
    return done
