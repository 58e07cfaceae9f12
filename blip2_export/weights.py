"""Weights from the checkpoint to the graphs, one tensor at a time (the "big models" part of DESIGN.md).

A model this exporter traces need not hold its weights: :func:`load_checkpoint_lazy` builds it from the
config with parameters that take no memory (zeros the OS maps to its one zero page), and a
:class:`CheckpointWeights` reads any parameter's real values from the checkpoint's safetensors when a
graph's external data is written. :func:`export_onnx_streaming` exports a graph with its parameters as
inputs, folds the constant parts the way the TorchScript exporter's constant folding does (``Transpose``
of a weight becomes a transposed initializer), and writes every initializer straight to the graph's
external-data file, computing one at a time. The graph the engines see is the folded graph they always saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines.tensor_store import DataWriter, make_tensor
from runtime.errors import Blip2Error

# Ops whose result the folding computes once when every input is a constant (as torch's exporter does
# for the ops it folds). Identity is kept: the exporter uses it to share one weight between two uses.
FOLDABLE = frozenset({
    "Transpose", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Slice", "Concat", "Gather", "Sqrt", "Div", "Mul",
    "Add", "Sub", "Neg", "Shape", "Size", "Range", "Where", "Equal", "Greater", "Less", "Not", "Pow",
    "Softmax", "ReduceL1", "ReduceL2", "ReduceProd", "Flatten", "Expand", "Reciprocal",
})


class ModuleWeights:
    """Values of a model's own parameters (an in-memory model: nothing to stream from)."""

    def array(self, tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()


class CheckpointWeights:
    """Values of a lazily built model's parameters, read from the checkpoint's safetensors on demand.

    Each parameter is found under any of the names the model gives it (tied weights have several), so
    a tied LM head reads the one table the checkpoint stores. Tensors are read with plain file reads into
    one float32 array (fp16 / bf16 converted in chunks): no memory map whose pages would stay resident.
    """

    def __init__(self, folder: str | Path, model):
        self.folder = Path(folder)
        self.files = safetensors_keys(self.folder)
        self.headers: dict[str, tuple[dict, int]] = {}
        self.names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)

    def array(self, tensor) -> np.ndarray:
        names = self.names.get(id(tensor))
        if names is None:
            raise Blip2Error("a traced weight is not a parameter of the checkpoint's model")
        key = next((n for n in names if n in self.files), None)
        if key is None:
            raise Blip2Error(f"the checkpoint has no tensor {names[0]!r} (nor {', '.join(names[1:]) or 'an alias'})",
                             hint="re-save the checkpoint with transformers' save_pretrained")
        return self.read(key)

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` of the checkpoint as a float32 array."""
        file = self.folder / self.files[key]
        if file.name not in self.headers:
            self.headers[file.name] = read_safetensors_header(file)
        header, base = self.headers[file.name]
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise Blip2Error(f"{file.name} has no tensor {key!r} (its index says it does)")
        dtype, shape = entry.get("dtype"), tuple(int(d) for d in entry.get("shape", ()))
        start, end = (int(x) for x in entry["data_offsets"])
        if dtype not in SAFETENSORS_FLOATS:
            raise Blip2Error(f"{file.name}: tensor {key!r} is {dtype}, not a float type")
        itemsize = SAFETENSORS_FLOATS[dtype]
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * itemsize:
            raise Blip2Error(f"{file.name}: tensor {key!r} has {end - start} bytes for {count} {dtype} values")
        out = np.empty(count, np.float32)
        with open(file, "rb") as f:
            f.seek(base + start)
            if dtype == "F32":
                if f.readinto(memoryview(out).cast("B")) != end - start:
                    raise Blip2Error(f"{file.name} ends inside tensor {key!r}")
            else:
                step = 1 << 22  # values converted per read
                for i in range(0, count, step):
                    n = min(step, count - i)
                    raw = f.read(n * itemsize)
                    if len(raw) != n * itemsize:
                        raise Blip2Error(f"{file.name} ends inside tensor {key!r}")
                    if dtype == "F16":
                        out[i:i + n] = np.frombuffer(raw, np.float16)
                    else:  # BF16: the high half of a float32
                        out[i:i + n] = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        return out.reshape(shape)


SAFETENSORS_FLOATS = {"F32": 4, "F16": 2, "BF16": 2}


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file: 8-byte little-endian length, then JSON."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise Blip2Error(f"{file.name} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise Blip2Error(f"{file.name}: safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Blip2Error(f"{file.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise Blip2Error(f"{file.name} is not a safetensors file (bad header)")
    return header, 8 + n


def safetensors_keys(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file (from ``model.safetensors.index.json`` when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return {str(k): str(v) for k, v in json.loads(index.read_text())["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise Blip2Error(f"{index} is not a safetensors index (no weight_map)") from None
    keys: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header, _ = read_safetensors_header(f)
        keys.update((k, f.name) for k in header if k != "__metadata__")
    return keys


def weightless_model(config):
    """A ``Blip2ForConditionalGeneration`` for ``config`` whose parameters take no memory.

    Built on the meta device (no allocation, no random init), then every parameter becomes float32 zeros
    never written but for one value of its own (one page each), which torch can trace through in place
    (tied parameters stay one object).
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    return_large_frees_to_os()  # every stand-in of 1 MiB or more a fresh mapping: zero pages until written
    standins: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in standins:
                # Zeros the OS has not allocated (reading them maps its one zero page, which RSS does not
                # count), with a first value of its own: the exporter shares weights of equal value.
                # Contiguous, so the traced matmuls read them in place (a stride-0 view would be copied).
                value = torch.from_numpy(np.zeros(tuple(p.shape), np.float32))
                value.view(-1)[:1] = float(len(standins) + 1)
                standins[id(p)] = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[name] = standins[id(p)]
    _fill_meta_buffers(model)
    if any(b.device.type == "meta" for b in model.buffers()):
        raise Blip2Error("the model has buffers that a weightless build cannot fill")
    return model.eval()


def _fill_meta_buffers(model) -> None:
    """Compute the buffers the meta build left empty (e.g. a LLaMA rotary embedding's ``inv_freq``): each
    module holding one is built again on the CPU from its own config (buffers are small)."""
    import torch

    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if not meta or getattr(module, "config", None) is None:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
        except TypeError:
            continue  # another constructor: the caller refuses the build
        for n in meta:
            module._buffers[n] = fresh._buffers[n]
        for n, v in vars(fresh).items():  # values derived beside the buffers (e.g. attention_scaling)
            if not n.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(module, n, v)


def graph_weights(module) -> dict:
    """name -> parameter of ``module``, as the TorchScript exporter names its weights."""
    return dict(module.state_dict(keep_vars=True))


def export_onnx_streaming(module, args: tuple, io, path: Path, opset: int, external_threshold: int,
                          weights) -> list[str]:
    """Export ``module`` to ``path`` with its weights streamed from ``weights``; return external data files.

    The TorchScript exporter runs without its parameters (they become graph inputs, nothing is
    serialised); :func:`fold_weights` then folds the constant parts and each initializer is computed,
    written and dropped in turn.
    """
    import tempfile

    import onnx
    import torch


    module.eval()
    return_large_frees_to_os()
    params = graph_weights(module)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as work:
        tmp = Path(work) / path.name
        with warnings.catch_warnings(), torch.no_grad(), _shape_inference_without_weight_values():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(tmp), input_names=io.input_names(), output_names=io.output_names(),
                dynamic_axes=io.dynamic_axes(), opset_version=opset, dynamo=False, do_constant_folding=False,
                export_params=False,
            )
        proto = onnx.load(str(tmp))
    release_freed_memory()  # the trace's many small buffers: give them back before the weights come in
    sources = {name: (lambda p=p: weights.array(p)) for name, p in params.items()}
    plan = fold_weights(proto, sources)
    total = sum(nbytes for _, nbytes, _ in plan)
    data_name = path.name + ".data"
    external = total > external_threshold
    tmp_data = path.parent / f".{data_name}.tmp"
    writer = DataWriter(tmp_data, data_name) if external else None
    try:
        for name, nbytes, compute in plan:
            arr = compute()
            t = make_tensor(arr, name, writer)  # small ones inline, large ones straight to the data file
            del arr
            proto.graph.initializer.append(t)
        if writer is not None:
            writer.close()
            writer.relocate(proto.graph.initializer)
            os.replace(tmp_data, path.parent / data_name)
        tmp_graph = path.parent / f".{path.name}.tmp"
        onnx.save_model(proto, str(tmp_graph))
        os.replace(tmp_graph, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp_data.exists():
            tmp_data.unlink()
    return [data_name] if external else []


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping (glibc), returned to the OS when freed.

    glibc raises this threshold after each large free (up to 32 MiB), after which weight-sized buffers
    come from the heap and stay resident once freed: tracing one weight after another, or reading one
    tensor after another, would then keep the largest of them all. Fixed at 1 MiB the process's peak is
    what it holds at once. A no-op where the C library is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@contextlib.contextmanager
def _shape_inference_without_weight_values():
    """Run the TorchScript exporter's ONNX shape inference without the weights' values.

    With ``export_params=False`` the weights are graph inputs whose shapes the trace already knows; the
    pass would still serialise every weight's values into a model for ONNX's shape inference (1.5 GB
    at once for a 4-layer OPT-2.7b decoder). Given no values it writes the same graph (the tests
    compare it with the in-memory export). A torch without that pass is left as it is.
    """
    import torch

    c = torch._C
    name = "_jit_pass_onnx_graph_shape_type_inference"
    original = getattr(c, name, None)
    if original is None:
        yield
        return

    def without_values(graph, params_dict, opset):
        return original(graph, {}, opset)

    setattr(c, name, without_values)
    try:
        yield
    finally:
        setattr(c, name, original)


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps it for reuse; peak RSS is what a small box feels)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def fold_weights(model, sources: dict[str, Callable[[], np.ndarray]]) -> list[tuple[str, int, Callable]]:
    """Fold the constant part of ``model`` (weights given as graph inputs named in ``sources``).

    A node is folded when its op is in :data:`FOLDABLE` and every input is a weight, a ``Constant`` or a
    folded value; the folded nodes, the weight inputs and the ``Constant`` nodes used only by folded nodes
    are removed. Every constant value a remaining node or a graph output reads becomes an initializer when
    it depends on a weight, else a ``Constant`` node in the place of the node that computed it.
    Returns, in graph order, ``(initializer name, bytes, compute)`` for each of them: ``compute()``
    evaluates that one value from the weights it depends on (nothing is held between calls).
    """
    from onnx import NodeProto, helper, numpy_helper

    def detached(node):  # the graph's nodes are rewritten below; the values are computed later
        copy = NodeProto()
        copy.CopyFrom(node)
        return copy

    graph = model.graph
    weight_inputs = [i for i in graph.input if i.name in sources]
    consts: dict[str, object] = {}  # value name -> "weight" | Constant node | folded node
    for i in weight_inputs:
        consts[i.name] = "weight"
    folded = []
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain and node.attribute[0].name == "value":
            consts[node.output[0]] = detached(node)
        elif (not node.domain and node.op_type in FOLDABLE
              and all(x == "" or x in consts for x in node.input)):
            folded.append(node)
            copy = detached(node)
            for o in node.output:
                consts[o] = copy
    folded_ids = {id(n) for n in folded}
    readers: dict[str, int] = {}
    for node in graph.node:
        if id(node) in folded_ids or node.op_type == "Constant" and node.output[0] in consts:
            continue
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1

    def compute(name: str) -> np.ndarray:
        memo: dict[str, np.ndarray] = {}

        def value(x: str) -> np.ndarray:
            if x in memo:
                return memo[x]
            src = consts[x]
            if src == "weight":
                v = sources[x]()
            elif _is_constant_node(src):
                v = numpy_helper.to_array(src.attribute[0].t)
            else:
                outs = _run_node(src, [value(i) if i else None for i in src.input])
                for o, ov in zip(src.output, outs):
                    memo[o] = ov
                v = memo[x]
            memo[x] = v
            return v

        try:
            return value(name)
        finally:
            memo.clear()  # ``value`` is a closure cycle: without this its arrays wait for the GC

    outputs = {o.name for o in graph.output}
    frontier = [name for name in consts
                if (name in readers or name in outputs) and not _is_constant_node(consts[name])]
    from_weights = _depends_on_weights(consts)
    # A folded value made of Constants only stays a Constant node (as the exporter folds it), in the place
    # of the node that computed it; one that depends on a weight becomes an initializer.
    inline = {name for name in frontier if not from_weights[name]}
    frontier = [name for name in frontier if name not in inline]
    keep = []
    for n in graph.node:
        if id(n) in folded_ids:
            keep += [_constant_node(o, compute(o)) for o in n.output if o in inline]
        elif not (n.op_type == "Constant" and n.output and n.output[0] in consts and n.output[0] not in readers):
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    remaining = [i for i in graph.input if i.name not in sources]
    del graph.input[:]
    graph.input.extend(remaining)

    # Folded weights take the names the exporter's own folding gives them (short, unique): onnx::MatMul_7.
    first_reader = {}
    for n in keep:
        for x in n.input:
            first_reader.setdefault(x, n.op_type)
    taken = {x for n in keep for x in (*n.input, *n.output)} | {i.name for i in graph.input}
    renamed: dict[str, str] = {}
    for name in frontier:
        if consts[name] == "weight":
            continue
        k = len(renamed)
        new_name = f"onnx::{first_reader.get(name, 'Output')}_{k}"
        while new_name in taken:
            k += 1
            new_name = f"onnx::{first_reader.get(name, 'Output')}_{k}"
        taken.add(new_name)
        renamed[name] = new_name
    for n in graph.node:
        for j, x in enumerate(n.input):
            if x in renamed:
                n.input[j] = renamed[x]
    for o in graph.output:
        if o.name in renamed:  # a graph output must keep its name: an Identity gives it the folded value
            graph.node.append(helper.make_node("Identity", [renamed[o.name]], [o.name]))

    sizes = _weight_bytes(weight_inputs)

    def nbytes(name: str) -> int:  # a folded value is about as large as the weights it is made from
        seen, stack, total = set(), [name], 0
        while stack:
            x = stack.pop()
            if x in seen or x not in consts:
                continue
            seen.add(x)
            if consts[x] == "weight":
                total += sizes[x]
            elif not _is_constant_node(consts[x]):
                stack.extend(i for i in consts[x].input if i)
        return total

    return [(renamed.get(name, name), nbytes(name), (lambda n=name: compute(n))) for name in frontier]


def _depends_on_weights(consts: dict) -> dict[str, bool]:
    """For each constant value: does it depend on a weight (else only on Constant nodes)?"""
    out: dict[str, bool] = {}
    for name, src in consts.items():  # in graph order: every input is decided before its consumers
        if src == "weight":
            out[name] = True
        elif _is_constant_node(src):
            out[name] = False
        else:
            out[name] = any(out.get(i, False) for i in src.input if i)
    return out


def _constant_node(name: str, value: np.ndarray):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=f"{name}/Constant",
                            value=numpy_helper.from_array(np.asarray(value), name))


def _is_constant_node(src) -> bool:
    return not isinstance(src, str) and src is not None and getattr(src, "op_type", None) == "Constant"


def _weight_bytes(inputs) -> dict[str, int]:
    """Bytes of each weight input, from its declared shape and type."""
    from onnx import helper

    out = {}
    for i in inputs:
        tt = i.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        out[i.name] = int(np.prod(dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    return out


def _run_node(node, inputs: list) -> list:
    if node.op_type == "Transpose" and inputs[0] is not None:  # a view: written in blocks, never copied whole
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return [np.transpose(inputs[0], perm)]
    from onnx.reference import ReferenceEvaluator

    feeds = {x: v for x, v in zip(node.input, inputs) if x}
    return ReferenceEvaluator(node).run(None, feeds)
