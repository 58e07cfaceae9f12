"""fp32 ONNX graph -> fp16 ONNX graph, with fp32 islands where fp16 is known to break.

Precision lives in the graph (DESIGN.md): the file this writes is what ONNX Runtime runs and what
TensorRT builds as a strongly typed network, so both see the same types.

What stays fp32 (compute), per graph:
  * every graph: LayerNormalization, Softmax and the reductions/powers a decomposed norm is made of,
    plus the ops ONNX Runtime's converter lists as unsafe in fp16 (Range, CumSum, TopK, ...);
  * ``qformer``: the whole graph, as transformers keeps the Q-Former in fp32 (``_keep_in_fp32_modules``);
  * any output the contract declares float32 even at fp16 (``logits``): the node that computes it;
  * T5 LLMs: the feed-forward output projections (``wo``), which overflow fp16 (transformers keeps them fp32).

Weights are *stored* in fp16 everywhere, including the fp32 islands (a Cast upcasts them once, and
both runtimes fold it at load): that is what halves the files. Graph IO follows the contract's
dtype parameter (``float16`` for activations and KV cache, ``float32`` where the contract fixes it),
and the manifest records it; the runtime casts feeds to it.

No torch here: onnx + numpy + ONNX Runtime's ``float16`` converter (a runtime dependency already).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.onnx_utils import (
    ensure_node_names,
    producer_through,
    toposort,
)
from engines.tensor_store import load_lazy
from runtime.contract import GraphIO, GraphName
from runtime.errors import Blip2Error

# Ops computed in fp32 inside fp16 graphs (with Casts at their boundaries).
FP32_OPS: tuple[str, ...] = (
    "LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
)
# Shapes, indices and ops ONNX Runtime's converter refuses in fp16.
_UNSAFE_OPS: tuple[str, ...] = ("Range", "CumSum", "Min", "Max", "TopK", "Upsample", "RandomUniformLike",
                                "NonMaxSuppression", "RoiAlign")
# Graphs whose compute stays fp32 (weights are still stored fp16).
FP32_GRAPHS: frozenset[str] = frozenset({GraphName.QFORMER.value})
# Float initializers with at least this many elements are stored fp16 even when fp32 nodes use them.
STORE_FP16_MIN_ELEMENTS = 1024


@dataclass
class Fp16Result:
    model: object  # onnx.ModelProto
    fp32_nodes: list[str] = field(default_factory=list)
    fp32_ops: dict[str, int] = field(default_factory=dict)
    fp16_stored_fp32_weights: int = 0  # weights stored fp16 but upcast for an fp32 island

    def notes(self, whole_graph_fp32: bool) -> dict:
        if whole_graph_fp32:
            return {"transform": "fp16", "fp32_compute": "whole graph (IO and weights fp16, compute fp32)",
                    "fp32_weights_stored_fp16": self.fp16_stored_fp32_weights}
        return {
            "transform": "fp16",
            "fp32_compute": "islands",
            "fp32_op_counts": dict(sorted(self.fp32_ops.items())),
            "fp32_nodes": self.fp32_nodes if len(self.fp32_nodes) <= 64 else
            self.fp32_nodes[:64] + [f"... {len(self.fp32_nodes) - 64} more"],
            "fp32_weights_stored_fp16": self.fp16_stored_fp32_weights,
        }


def fp32_islands(model, graph: str, io: GraphIO, llm_type: str = "") -> list[str]:
    """Names of the nodes of ``model`` that must compute in fp32 for graph ``graph``."""
    nodes = list(model.graph.node)
    if graph in FP32_GRAPHS:
        return [n.name for n in nodes]
    keep = [n.name for n in nodes if n.op_type in FP32_OPS]
    # The node computing each output the contract keeps float32 (logits), seen through Casts/reshapes.
    for spec in io.outputs:
        if spec.dtype == "float32":
            node = producer_through(model, spec.name, skip=("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"))
            if node is not None:
                keep.append(node.name)
    if llm_type == "t5":
        keep += [n.name for n in nodes if "/wo/" in n.name and n.op_type in ("MatMul", "Gemm")]
    return sorted(set(keep))


def convert_fp16(src: str | Path, graph: str, io: GraphIO, llm_type: str = "", writer=None) -> Fp16Result:
    """Convert the fp32 ONNX file ``src`` of graph ``graph`` to fp16; ``io`` is the contract's fp16 IO.

    The weights never pass through the converter (#13): the graph is read without them
    (:func:`engines.tensor_store.load_lazy`), each large float initializer stands in as a graph input of
    its name, type and shape while ONNX Runtime's converter retypes the graph (it makes them float16 and
    puts a Cast to float32 in front of every fp32 island that reads one), then each weight is read,
    rounded to float16 the way the converter rounds and written to ``writer`` (a
    :class:`engines.tensor_store.DataWriter`; held in memory without one), one at a time."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load_lazy(src)
    ensure_node_names(model)
    keep = fp32_islands(model, graph, io, llm_type)
    fp32_io = [t.name for t in (*io.inputs, *io.outputs) if t.dtype == "float32"]
    op_types = {n.name: n.op_type for n in model.graph.node}
    held = _weights_as_inputs(model)
    model = convert_float_to_float16(
        model, keep_io_types=fp32_io, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(_UNSAFE_OPS)),
        node_block_list=keep, disable_shape_infer=False,
    )
    stored = _weights_back(model, held, writer)
    toposort(model)
    _check_io(model, io)
    counts: dict[str, int] = {}
    for name in keep:
        counts[op_types[name]] = counts.get(op_types[name], 0) + 1
    islands = [n for n in keep if op_types[n] not in FP32_OPS]
    return Fp16Result(model, fp32_nodes=islands if graph not in FP32_GRAPHS else [], fp32_ops=counts,
                      fp16_stored_fp32_weights=stored)


def _weights_as_inputs(model, min_elements: int = STORE_FP16_MIN_ELEMENTS) -> dict:
    """Take every float initializer of at least ``min_elements`` out of ``model`` and declare a graph input
    of its name, type and shape instead; return them by name. Smaller external ones are read in (the
    converter retypes what it holds, so none of them may stay a reference to float32 bytes)."""
    from onnx import TensorProto, helper

    from engines.tensor_store import is_external, read_external_bytes

    held, kept = {}, []
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type == TensorProto.FLOAT and n >= min_elements:
            held[t.name] = t
            model.graph.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)))
            continue
        if is_external(t):
            t.raw_data = read_external_bytes(t)
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
        kept.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return held


def _weights_back(model, held: dict, writer=None) -> int:
    """Make the stand-in inputs of :func:`_weights_as_inputs` initializers again, in the type the converter
    gave them (float16; float32 where it left one), reading and writing one weight at a time. Returns how
    many are read through a Cast to float32.

    A weight that only fp32 islands read is still stored float16 (clipped to its range) behind the Cast
    the converter put there: the islands compute in fp32 on weights rounded to fp16, as transformers
    does when it loads an fp16 checkpoint into a module kept in fp32, and the file holds half the bytes.
    A weight that fp16 compute reads is rounded as the converter rounds."""
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from engines.tensor_store import make_tensor, tensor_array

    inputs = {v.name: v for v in model.graph.input}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)

    def upcast(node) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)

    new, count = [], 0
    for name, t in held.items():
        v = inputs[name]
        model.graph.input.remove(v)
        arr = tensor_array(t).astype(np.float32, copy=False)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            users = readers.get(name, [])
            if users and all(upcast(u) for u in users):  # only fp32 islands read it
                arr = np.clip(arr, -65504, 65504).astype(np.float16)
                count += 1
            else:
                arr = convert_np_to_float16(arr)  # fp16 compute reads it: the converter's rounding
                count += any(upcast(u) for u in users)
        new.append(make_tensor(np.ascontiguousarray(arr), name, writer))
        del arr
    model.graph.initializer.extend(new)
    return count


def _check_io(model, io: GraphIO) -> None:
    """The converted graph's IO types must be what the manifest will declare."""
    from onnx import helper


    declared = {t.name: t.dtype for t in (*io.inputs, *io.outputs)}
    for v in (*model.graph.input, *model.graph.output):
        got = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        want = declared.get(v.name)
        if want is not None and got != want:
            raise Blip2Error(f"fp16 conversion left {v.name} as {got}, the contract declares {want} "
                             "(a bug in engines/fp16.py)")
