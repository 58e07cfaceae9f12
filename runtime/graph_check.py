"""Walk an ONNX graph from a bundle before any backend (or ``onnx`` itself) loads it.

A graph file is untrusted input. ONNX lets any tensor keep its values in an "external data" file named
by a path, and ONNX Runtime before 1.24 follows such a path wherever it points (``../../secret``, an
absolute path, a symlink). So this walk, not the backend's own check, decides what a graph may read:

* every tensor whose values are external is a top-level initializer whose location is one of the
  graph's manifest-listed, checksummed data files (a plain name); tensors in subgraphs, node attributes
  (``Constant``), sparse initializers and functions must hold their values inline;
* every operator is one our exporter and builders emit (plus their close relatives): no ``Loop``,
  ``Scan`` or ``If`` (a graph could loop for ever), no sequence, optional or string operators;
* no model-local functions.

:func:`parse_graph` reads the bytes already checked against the manifest (never a path), without
external data. The result lists each external initializer and where its bytes are, so the backend can
hand them over from memory (see ``runtime.backends.ort``).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.bundle_files import BundleFiles, printable
from runtime.errors import BundleError, require

# (domain, op_type) our exporter (torch.onnx), fp16/int8 transforms and ORT engine builds emit, and the
# ordinary tensor operators a transformers model of another family exports to. Deliberately absent:
# Loop, Scan, If (unbounded or data-dependent control flow), sequence/optional/string operators.
_ONNX_OPS = """
Abs Acos Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization BitShift Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu
Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul
MatMulInteger Max MaxPool Mean Min Mish Mod Mul Neg Not OneHot Or PRelu Pad Pow QLinearConv QLinearMatMul
QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize RMSNormalization RotaryEmbedding Round ScatterElements ScatterND
Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
"""
_MS_OPS = """
Attention BiasAdd BiasGelu BiasSoftmax DequantizeLinear DynamicQuantizeMatMul FastGelu FusedConv FusedGemm
FusedMatMul Gelu GemmFastGelu GroupQueryAttention MatMulIntegerToFloat MatMulNBits MultiHeadAttention
QuantizeLinear QuickGelu RotaryEmbedding SimplifiedLayerNormalization SkipLayerNormalization
SkipSimplifiedLayerNormalization
"""
ALLOWED_OPS: frozenset[tuple[str, str]] = frozenset(
    {("", op) for op in _ONNX_OPS.split()} | {("ai.onnx", op) for op in _ONNX_OPS.split()}
    | {("com.microsoft", op) for op in _MS_OPS.split()})
MAX_GRAPH_DEPTH = 8  # nested subgraphs (we emit none; a bound keeps the walk itself finite)


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    location: str
    offset: int
    length: int
    data_type: int
    dims: tuple[int, ...]


def parse_graph(data: bytes | bytearray, where: str):
    """The ``ModelProto`` in ``data`` (no external data is read; ``onnx`` imported lazily)."""
    onnx = require("onnx", "cpu")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise BundleError(f"{printable(where)} is not an ONNX graph: {str(e).splitlines()[0][:120] if str(e) else e}",
                          hint="re-export the bundle") from None
    if not model.HasField("graph"):
        raise BundleError(f"{printable(where)} is not an ONNX graph (no graph in it)", hint="re-export the bundle")
    return model


def check_graph(model, data_files: dict[str, int], where: str) -> list[ExternalTensor]:
    """Refuse ``model`` unless every operator is allowed and every external tensor is a top-level
    initializer in one of ``data_files`` (name -> size in bytes) within its bounds; return those tensors."""
    onnx = require("onnx", "cpu")
    tp = onnx.TensorProto
    where = printable(where)
    if len(model.functions):
        raise BundleError(f"graph {where} defines model-local functions, which no blip2-export graph has",
                          hint="the bundle is damaged or hostile: re-export it")
    external: list[ExternalTensor] = []

    def inline_only(t, what: str) -> None:
        if t.data_location == tp.EXTERNAL or len(t.external_data):
            raise BundleError(f"graph {where}: {what} {printable(t.name)!r} keeps its values outside the graph, "
                              "which only top-level initializers may do", hint="the bundle is damaged or hostile")

    def walk(graph, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise BundleError(f"graph {where} nests subgraphs too deeply")
        for t in graph.initializer:
            if depth == 0 and (t.data_location == tp.EXTERNAL or len(t.external_data)):
                external.append(_external(t, data_files, where))
            else:
                inline_only(t, "initializer")
        for s in graph.sparse_initializer:
            inline_only(s.values, "sparse initializer")
            inline_only(s.indices, "sparse initializer")
        for node in graph.node:
            key = (node.domain, node.op_type)
            if key not in ALLOWED_OPS:
                domain = f"{node.domain}." if node.domain else ""
                raise BundleError(f"graph {where} uses operator {printable(domain + node.op_type)!r}, which "
                                  "blip2-export graphs never contain",
                                  hint="the bundle is damaged or hostile: re-export it")
            for a in node.attribute:
                if a.HasField("t"):
                    inline_only(a.t, f"attribute {a.name} of node")
                for t in a.tensors:
                    inline_only(t, f"attribute {a.name} of node")
                if a.HasField("sparse_tensor"):
                    inline_only(a.sparse_tensor.values, f"attribute {a.name} of node")
                    inline_only(a.sparse_tensor.indices, f"attribute {a.name} of node")
                for s in a.sparse_tensors:
                    inline_only(s.values, f"attribute {a.name} of node")
                    inline_only(s.indices, f"attribute {a.name} of node")
                if a.HasField("g"):
                    walk(a.g, depth + 1)
                for g in a.graphs:
                    walk(g, depth + 1)

    walk(model.graph, 0)
    return external


_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
PACKED_4BIT = (21, 22)  # UINT4, INT4 (int4 weights): two values per byte


def set_external(t, location: str, offset: int, length: int) -> None:
    """Point initializer ``t`` at ``length`` bytes at ``offset`` of data file ``location`` (its values are
    kept there, not in the graph)."""
    require("onnx", "cpu")
    from onnx import TensorProto

    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def stored_bytes(data_type: int, count: int) -> int:
    """Bytes an ONNX tensor of ``count`` values of ``data_type`` takes in raw/external data."""
    if data_type in PACKED_4BIT:
        return (count + 1) // 2
    return count * _ITEMSIZE[data_type]


def _external(t, data_files: dict[str, int], where: str) -> ExternalTensor:
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if loc not in data_files:
        raise BundleError(f"graph {where}: initializer {printable(t.name)!r} reads its values from "
                          f"{printable(loc)!r}, which is not one of this graph's listed data files "
                          f"({', '.join(sorted(data_files)) or 'none'})",
                          hint="the bundle is damaged or hostile: re-export it")
    if t.data_type not in _ITEMSIZE and t.data_type not in PACKED_4BIT:
        raise BundleError(f"graph {where}: external initializer {printable(t.name)!r} has data type "
                          f"{t.data_type}, which blip2-export never stores outside a graph")
    count = 1
    for d in t.dims:
        if d < 0:
            raise BundleError(f"graph {where}: initializer {printable(t.name)!r} has a negative dimension")
        count *= d
    try:
        offset = int(info.get("offset", "0"))
        length = int(info.get("length", str(stored_bytes(t.data_type, count))))
    except ValueError:
        raise BundleError(f"graph {where}: initializer {printable(t.name)!r} has a malformed offset or length")
    if length != stored_bytes(t.data_type, count) or offset < 0 or offset + length > data_files[loc]:
        raise BundleError(f"graph {where}: initializer {printable(t.name)!r} asks for bytes "
                          f"[{offset}, {offset + length}) of {printable(loc)} ({data_files[loc]} bytes) for "
                          f"{count} values", hint="the bundle is damaged or hostile: re-export it")
    return ExternalTensor(t.name, loc, offset, length, t.data_type, tuple(int(d) for d in t.dims))


def check_bundle_graphs(bundle, manifest, *, verify: bool = True) -> int:
    """Walk every ONNX graph the manifest lists (portable graphs and ORT engine builds) as the runtime
    would before loading it: an external-data location that is not one of the graph's own listed files
    (an unlisted, unhashed file in the bundle, or one outside it) is refused. Returns the graphs walked."""

    files = BundleFiles(bundle, verify=verify)
    walked = 0
    for graphs in manifest.graphs.values():
        for rec in graphs.values():
            targets = [(rec.file, rec.sha256, [e.file for e in rec.external_data])]
            info = rec.ort_engine
            for e in rec.engines:
                if e.backend == "ort" and info is not None and e.file == info.file:
                    targets.append((e.file, e.sha256, list(info.external_data)))
            for file, digest, data in targets:
                raw = files.read(file, digest, limit=2**31 - 1, what="graph", as_bytes=True)
                check_graph(parse_graph(raw, file), {n: files.size(n) for n in data}, file)
                walked += 1
    return walked
