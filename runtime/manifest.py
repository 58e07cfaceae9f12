"""The bundle manifest: the only contract between export and run.

``manifest.json`` at the root of a bundle says which graphs exist (per precision), their IO (from
``runtime.contract``), the min/opt/max of every dynamic dim, checksums of every file, the model facts
the runtime needs, preprocessing and default generation settings. Everything that reads a bundle goes
through :func:`load_manifest`, which validates it and explains what is wrong.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime import contract
from runtime.bundle_files import BundleFiles, check_name, printable
from runtime.contract import Family, GraphIO, GraphName, TensorSpec
from runtime.errors import Blip2Error, BundleError, LimitError
from runtime.generation import GenerationConfig
from runtime.integrity import sha256_file
from runtime.precisions import PRECISION_NAMES, TRANSFORMS, legacy_transform, role_of
from runtime.precisions import PRECISIONS as PRECISION_SPECS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = PRECISION_NAMES  # from the registry (runtime.precisions)
RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
IO_DTYPES = ("float32", "float16", "int64", "int32")  # what a graph input or output may be
KV_CONCAT = "concat"  # a decoder's cache: past in, past + new out (the exported graph; every backend)
KV_SHARED = "shared_buffer"  # one cache buffer bound as past and present (ORT engine builds; runtime.decoder_only)
KV_CACHE_MODES = (KV_CONCAT, KV_SHARED)  # notes["ort_engine"]["kv_cache"]
_MAX_SIZE = 1 << 24  # no model size, token id or length in a real manifest comes near this
MAX_MANIFEST_BYTES = 16 << 20
# Caps on what a (possibly hostile) manifest may ask the runtime to allocate or loop over. Published
# BLIP-2 models sit far below each (224-490 px, 32 queries, 2048 positions, beams <= 5).
MAX_IMAGE_SIDE = 4096  # pixels per side of the vision graph's input
MAX_CONTEXT = 1 << 17  # positions
MAX_BATCH = 1024  # rows through a graph (images x beams)
MAX_BEAMS = 64
MAX_NEW_TOKENS = 1 << 14
MAX_VOCAB = 1 << 21
MAX_HIDDEN = 1 << 16
MAX_FILES = 4096  # file records in one manifest


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def check(self, name: str, value: int, flag: str | None = None) -> None:

        if not self.min <= value <= self.max:
            hint = f"re-export or rebuild with a larger {flag}" if flag and value > self.max else None
            raise LimitError(f"{name}={value} is outside the range this bundle supports [{self.min}, {self.max}]",
                             hint=hint)


@dataclass(frozen=True)
class FileRecord:
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class EngineRecord:
    """A backend-specific build of a graph (TensorRT plan), valid only for the device it was built on."""

    file: str
    sha256: str
    backend: str  # "trt"
    device_name: str
    compute_capability: str
    backend_version: str
    profile: dict[str, list[int]] = field(default_factory=dict)  # dim -> [min, opt, max]


KV_DTYPES = ("int8",)  # an ORT engine's KV cache type where it differs from the graph's float IO


@dataclass(frozen=True)
class OrtEngineFacts:
    """How the ORT engine build of a graph is loaded and fed (recorded as ``notes["ort_engine"]``; read
    through :attr:`GraphRecord.ort_engine`, validated when the manifest loads)."""

    file: str  # the engine graph, one of the record's engines
    external_data: tuple[str, ...] = ()  # its data files (possibly shared with the portable graph)
    kv_cache: str = KV_CONCAT  # how a decoder's cache is fed: KV_CONCAT or KV_SHARED
    kv_dtype: str | None = None  # the cache's type where it differs from the graph's float IO ("int8")
    lower_at_load: bool = False  # int8/int4 layers in the portable form: the runtime makes them MatMulNBits


@dataclass(frozen=True)
class GraphRecord:
    name: str
    file: str
    sha256: str
    io: GraphIO
    precision: str = "fp32"
    external_data: tuple[FileRecord, ...] = ()
    engines: tuple[EngineRecord, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. which nodes stay fp32, quantization settings
    # runtime.precisions.TRANSFORMS name: what made this graph (what its engines and the runtime go by).
    # Empty in records made in code before it was known; read from the notes for older manifests.
    transform: str = ""

    @property
    def transform_spec(self):
        """The :class:`runtime.precisions.Transform` of this graph."""
        return TRANSFORMS[self.transform or legacy_transform(self.precision, self.name, self.notes)]

    @property
    def ort_engine(self) -> OrtEngineFacts | None:
        """The ORT engine build of this graph, typed (None when it has none)."""
        info = self.notes.get("ort_engine")
        if not isinstance(info, dict):
            return None
        return OrtEngineFacts(file=str(info.get("file")), external_data=tuple(info.get("external_data", ())),
                              kv_cache=str(info.get("kv_cache", KV_CONCAT)), kv_dtype=info.get("kv_dtype"),
                              lower_at_load=info.get("lower_at_load") is True)


@dataclass(frozen=True)
class ModelFacts:
    family: str  # contract.Family value
    llm_type: str  # "opt", "t5", ... (transformers model_type of the text model)
    num_query_tokens: int
    image_size: int
    patches: int
    vision_hidden: int
    qformer_hidden: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int  # key/value heads: the KV cache's width (num_key_value_heads where the LLM has grouped queries)
    head_dim: int
    vocab_size: int
    max_context: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int | None
    decoder_start_token_id: int | None = None
    embed_dim: int = 256  # retrieval feature size
    llm_query_heads: int | None = None  # query heads where they differ from llm_heads (grouped-query attention)

    @property
    def query_heads(self) -> int:
        return self.llm_query_heads or self.llm_heads


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    convert_rgb: bool = True
    # The processor's do_* switches (BlipImageProcessor: all on); a bundle without them had them on.
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True


# Preprocess fields a manifest must state (the do_* switches may be absent: older bundles had them on).
PREPROCESS_REQUIRED = ("height", "width", "resample", "rescale_factor", "mean", "std", "convert_rgb")


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: ModelFacts
    preprocess: Preprocess
    generation: GenerationDefaults
    dims: dict[str, DimRange]
    graphs: dict[str, dict[str, GraphRecord]]  # precision -> graph name -> record
    files: dict[str, FileRecord]  # role -> file (tokenizer, embed_tokens, ...)
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def family(self) -> Family:
        return Family(self.model.family)

    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.graphs]

    def graph(self, name: str | GraphName, precision: str = "fp32") -> GraphRecord:
        name = GraphName(name).value
        if precision not in self.graphs:
            raise BundleError(
                f"bundle has no {precision} graphs (it has: {', '.join(self.precisions())})",
                hint=f"run 'blip2-export build BUNDLE --precision {precision}' first" if "fp32" in self.graphs
                else f"this deployment bundle holds {', '.join(self.precisions())} only: pass --precision "
                     f"{self.precisions()[0]}, or use the full bundle it was made from",
            )
        graphs = self.graphs[precision]
        if name not in graphs:
            raise BundleError(f"bundle has no {name!r} graph for {precision} (it has: {', '.join(graphs)})")
        return graphs[name]

    def required_graphs(self) -> list[GraphName]:
        return REQUIRED_GRAPHS[self.family]

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict:
        def graph_json(g: GraphRecord) -> dict:
            d = asdict(g)
            d["io"] = {"inputs": [t.to_json() for t in g.io.inputs], "outputs": [t.to_json() for t in g.io.outputs]}
            return d

        return {
            "format_version": self.format_version,
            "source": self.source,
            "versions": self.versions,
            "model": asdict(self.model),
            "preprocess": asdict(self.preprocess),
            "generation": asdict(self.generation),
            "dims": {k: asdict(v) for k, v in self.dims.items()},
            "files": {k: asdict(v) for k, v in self.files.items()},
            "graphs": {p: {n: graph_json(g) for n, g in gs.items()} for p, gs in self.graphs.items()},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)

    @staticmethod
    def from_json(d: dict) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("manifest.json must hold a JSON object")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError("manifest.json has no integer 'format_version'")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this blip2-export supports ({FORMAT_VERSION})",
                hint="upgrade blip2-export, or re-export the bundle with this version",
            )
        if version < 1:
            raise BundleError(f"bundle format version {version} is not valid")
        try:
            model = _build(ModelFacts, d["model"], tuples=("eos_token_ids",))
            pre = _build(Preprocess, d["preprocess"], tuples=("mean", "std"))
            missing = [k for k in PREPROCESS_REQUIRED if k not in d["preprocess"]]
            if missing:  # a default would quietly normalise images with other constants than the model's
                raise BundleError(f"manifest.json: preprocess.{missing[0]} is missing: the runtime would "
                                  "preprocess images differently from the model's processor",
                                  hint="re-export the bundle")
            gen = _build(GenerationDefaults, d.get("generation", {}))
            dims = {str(k): _build(DimRange, v) for k, v in _mapping(d, "dims").items()}
            files = {str(k): _build(FileRecord, v) for k, v in _mapping(d, "files").items()}
            graphs: dict[str, dict[str, GraphRecord]] = {}
            for prec, gs in _mapping(d, "graphs").items():
                if prec not in PRECISIONS:
                    raise BundleError(f"manifest names unknown precision {prec!r} (known: {', '.join(PRECISIONS)})")
                graphs[prec] = {}
                for name, g in dict(gs).items():
                    io = GraphIO(
                        tuple(TensorSpec.from_json(t) for t in g["io"]["inputs"]),
                        tuple(TensorSpec.from_json(t) for t in g["io"]["outputs"]),
                    )
                    graphs[prec][name] = GraphRecord(
                        name=str(g["name"]), file=str(g["file"]), sha256=str(g["sha256"]), io=io,
                        precision=str(g.get("precision", prec)),
                        external_data=tuple(_build(FileRecord, f) for f in g.get("external_data", [])),
                        engines=tuple(_build(EngineRecord, e) for e in g.get("engines", [])),
                        notes=dict(g.get("notes", {})),
                        transform=str(g.get("transform") or legacy_transform(prec, str(name), g.get("notes", {}))),
                    )
            source, versions = d.get("source", {}), d.get("versions", {})
            if not isinstance(source, dict) or not isinstance(versions, dict):
                raise BundleError("manifest.json fields 'source' and 'versions' must be objects")
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"manifest.json is malformed: {type(e).__name__}: {e}") from None
        m = Manifest(version, model, pre, gen, dims, graphs, files, dict(source), dict(versions))
        m.validate()
        return m

    # -- validation ------------------------------------------------------------------------------
    def expected_io(self, name: str, dtype: str = "float32") -> GraphIO:
        """The IO ``runtime.contract`` declares for graph ``name`` given this model's facts."""
        m = self.model
        g = GraphName(name)
        if g is GraphName.VISION:
            return contract.vision_io(m.image_size, m.patches, m.vision_hidden, dtype)
        if g is GraphName.QFORMER:
            return contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden, dtype)
        if g is GraphName.DECODER:
            return contract.decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size, dtype)
        if g is GraphName.ENCODER:
            return contract.encoder_io(m.llm_hidden, dtype)
        if g is GraphName.CROSS_KV:
            return contract.cross_kv_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, dtype)
        if g is GraphName.SEQ2SEQ_DECODER:
            return contract.seq2seq_decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim,
                                               m.vocab_size, dtype)
        if g is GraphName.IMAGE_FEATURES:
            return contract.image_features_io(m.patches, m.vision_hidden, m.num_query_tokens, m.embed_dim, dtype)
        if g is GraphName.TEXT_FEATURES:
            return contract.text_features_io(m.embed_dim)
        return contract.itm_io(m.patches, m.vision_hidden, dtype)

    def validate(self) -> None:
        try:
            family = self.family
        except ValueError:
            raise BundleError(f"unknown model family {self.model.family!r} in manifest") from None
        if not self.graphs:
            raise BundleError("manifest lists no graphs; the bundle is incomplete")
        # A full bundle has every fp32 graph; a deployment bundle ('blip2-export slim') has no fp32 and
        # every graph of each precision it keeps.
        for prec in ["fp32"] if "fp32" in self.graphs else list(self.graphs):
            for g in REQUIRED_GRAPHS[family]:
                if g.value not in self.graphs[prec]:
                    raise BundleError(f"manifest lists no {prec} {g.value!r} graph, which a {family.value} "
                                      "bundle needs")
        self._validate_values()
        for prec, graphs in self.graphs.items():
            for name, rec in graphs.items():
                try:
                    GraphName(name)
                except ValueError:
                    raise BundleError(f"manifest lists unknown graph {name!r}") from None
                if rec.name != name:
                    raise BundleError(f"{prec} graph {name!r} has the record of graph {rec.name!r}")
                got = [t.name for t in rec.io.inputs], [t.name for t in rec.io.outputs]
                exp_io = self.expected_io(name)
                exp = exp_io.input_names(), exp_io.output_names()
                if got != exp:
                    raise BundleError(f"{prec} graph {name!r} IO in the manifest does not match this runtime's "
                                      f"contract (inputs {got[0]} vs {exp[0]})")
                for t, e in zip((*rec.io.inputs, *rec.io.outputs), (*exp_io.inputs, *exp_io.outputs)):
                    if t.dtype not in IO_DTYPES:
                        raise BundleError(f"{prec} graph {name!r}: {t.name} has unknown dtype {t.dtype!r} "
                                          f"(known: {', '.join(IO_DTYPES)})")
                    if tuple(t.dims) != tuple(e.dims):
                        raise BundleError(f"{prec} graph {name!r}: {t.name} has dims {list(t.dims)}, but the "
                                          f"manifest's model facts give {list(e.dims)}")
                _check_ort_engine(prec, rec)
                if rec.transform and rec.transform not in PRECISION_SPECS[prec].transform_names(role_of(name)):
                    raise BundleError(f"{prec} graph {name!r} names transform {rec.transform!r}, which is not one "
                                      f"of {prec}'s ({', '.join(PRECISION_SPECS[prec].transform_names(role_of(name)))})")
        for io_dim in ("batch",):
            if io_dim not in self.dims:
                raise BundleError(f"manifest has no range for dim {io_dim!r}")
        if "tokenizer" not in self.files:
            raise BundleError("manifest lists no 'tokenizer' file")
        if family is not Family.RETRIEVAL and not self.model.eos_token_ids:
            raise BundleError("manifest model.eos_token_ids is empty: generation would never stop on its own")
        if family is Family.DECODER_ONLY and "embed_tokens" not in self.files \
                and not all(f"embed_tokens.{p}" in self.files for p in self.graphs):
            raise BundleError("manifest lists no 'embed_tokens' file, which a decoder-only bundle needs")
        total = self.dims.get("total")
        if total is not None and self.family is not Family.RETRIEVAL and self.model.max_context > total.max:
            raise BundleError(f"manifest model.max_context={self.model.max_context} exceeds the graphs' "
                              f"'total' range (max {total.max})")

    def _validate_values(self) -> None:
        """Numbers a runtime would trust: sizes positive, token ids inside the vocabulary, ranges ordered."""
        m = self.model
        for f in ("num_query_tokens", "image_size", "patches", "vision_hidden", "qformer_hidden", "llm_hidden",
                  "llm_layers", "llm_heads", "head_dim", "vocab_size", "max_context", "embed_dim"):
            _in_range(f"model.{f}", getattr(m, f), 1, _MAX_SIZE)
        for f in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
            if getattr(m, f) is not None:
                _in_range(f"model.{f}", getattr(m, f), 0, m.vocab_size - 1)
        for i in m.eos_token_ids:
            _in_range("model.eos_token_ids", i, 0, m.vocab_size - 1)
        if m.llm_query_heads is not None:
            _in_range("model.llm_query_heads", m.llm_query_heads, 1, MAX_CONTEXT)
            if m.llm_query_heads % m.llm_heads:
                raise BundleError(f"manifest model.llm_query_heads {m.llm_query_heads} is not a multiple of the "
                                  f"{m.llm_heads} key/value heads (model.llm_heads)")
        if m.image_token_id is not None:
            _in_range("model.image_token_id", m.image_token_id, 0, _MAX_SIZE)
        p = self.preprocess
        if (p.height, p.width) != (m.image_size, m.image_size):
            raise BundleError(f"manifest preprocess size {p.height}x{p.width} differs from the vision graph's "
                              f"input {m.image_size}x{m.image_size}")
        if p.resample not in RESAMPLE:
            raise BundleError(f"manifest preprocess.resample {p.resample!r} is not one of {', '.join(RESAMPLE)}")
        if p.rescale_factor <= 0 or min(p.std) <= 0:
            raise BundleError("manifest preprocess.rescale_factor and std must be > 0")

        g = self.generation
        try:
            GenerationConfig(max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=g.do_sample,
                             temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                             repetition_penalty=g.repetition_penalty, length_penalty=g.length_penalty).validate()
        except Blip2Error as e:
            raise BundleError(f"manifest generation defaults are invalid: {e}") from None
        for name, r in self.dims.items():
            _in_range(f"dims.{name}.min", r.min, 0, _MAX_SIZE)
            _in_range(f"dims.{name}.max", r.max, max(r.min, 1), _MAX_SIZE)
        if "batch" in self.dims and self.dims["batch"].min < 1:
            raise BundleError("manifest dims.batch.min must be >= 1")
        _in_range("model.image_size", m.image_size, 1, MAX_IMAGE_SIDE)
        _in_range("model.max_context", m.max_context, 1, MAX_CONTEXT)
        _in_range("model.vocab_size", m.vocab_size, 1, MAX_VOCAB)
        for f in ("vision_hidden", "qformer_hidden", "llm_hidden", "head_dim", "embed_dim"):
            _in_range(f"model.{f}", getattr(m, f), 1, MAX_HIDDEN)
        for f in ("num_query_tokens", "patches", "llm_layers", "llm_heads"):
            _in_range(f"model.{f}", getattr(m, f), 1, MAX_CONTEXT)
        for name, r in self.dims.items():
            _in_range(f"dims.{name}.max", r.max, 1, MAX_BATCH if name == "batch" else MAX_CONTEXT)
        _in_range("generation.num_beams", g.num_beams, 1, min(MAX_BEAMS, self.dims["batch"].max)
                  if "batch" in self.dims else MAX_BEAMS)
        _in_range("generation.max_new_tokens", g.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_files(self)


REQUIRED_GRAPHS: dict[Family, list[GraphName]] = {
    Family.DECODER_ONLY: [GraphName.VISION, GraphName.QFORMER, GraphName.DECODER],
    Family.ENCODER_DECODER: [GraphName.VISION, GraphName.QFORMER, GraphName.ENCODER, GraphName.CROSS_KV,
                             GraphName.SEQ2SEQ_DECODER],
    Family.RETRIEVAL: [GraphName.VISION, GraphName.IMAGE_FEATURES, GraphName.TEXT_FEATURES, GraphName.ITM],
}


def _in_range(what: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise BundleError(f"manifest {what}={value} is out of range [{lo}, {hi}]")


def _check_files(m: Manifest) -> None:
    """Every file record: a plain name, a sha256 digest, and one role (a file is one record of one graph,
    or one of ``files``: never both a graph and a tokenizer, never listed twice)."""
    roles: dict[str, str] = {}
    for count, (role, name, digest, size) in enumerate(iter_roles(m), 1):
        if count > MAX_FILES:
            raise BundleError(f"manifest lists over {MAX_FILES} files; a bundle holds a few dozen")
        check_name(name)
        if size is not None:
            _in_range(f"size of {printable(name)}", size, 0, 1 << 50)
        if not _is_sha256(digest):
            raise BundleError(f"manifest sha256 of {printable(name)} is not a 64-digit hex digest")
        if name in roles:
            raise BundleError(f"manifest lists {printable(name)} as {roles[name]} and as {role}: each bundle file "
                              "has one role", hint="the bundle is damaged or hostile: re-export it")
        roles[name] = role


def iter_roles(m: Manifest):
    """(role, file name, sha256, size or None) of every file record of the manifest."""
    for key, rec in m.files.items():
        yield f"files.{key}", rec.file, rec.sha256, rec.bytes
    for prec, graphs in m.graphs.items():
        for gname, g in graphs.items():
            yield f"the {prec} {gname} graph", g.file, g.sha256, None
            for ext in g.external_data:
                yield f"external data of the {prec} {gname} graph", ext.file, ext.sha256, ext.bytes
            for e in g.engines:
                yield f"an engine of the {prec} {gname} graph", e.file, e.sha256, None


def _is_sha256(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _check_ort_engine(prec: str, rec: GraphRecord) -> None:
    """``notes["ort_engine"]`` tells the ORT backend which engine file to load and how to feed its cache."""
    info = rec.notes.get("ort_engine")
    if info is None:
        return
    engine_files = {e.file for e in rec.engines}
    data_files = engine_files | {e.file for e in rec.external_data}  # an engine may share the graph's data
    ext = info.get("external_data", []) if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("file") not in engine_files \
            or info.get("kv_cache", "concat") not in KV_CACHE_MODES \
            or info.get("kv_dtype") not in (None, *KV_DTYPES) \
            or info.get("lower_at_load", False) not in (True, False) \
            or not isinstance(ext, list) or any(e not in data_files or e == info.get("file") for e in ext):
        raise BundleError(f"{prec} graph {rec.name!r}: notes.ort_engine must name one of its engine files "
                          f"({', '.join(sorted(engine_files)) or 'none'}), a kv_cache of "
                          f"{', '.join(KV_CACHE_MODES)}, a kv_dtype of {', '.join(KV_DTYPES)} or none, and "
                          "lower_at_load true or false")


def _mapping(d: dict, key: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise BundleError(f"manifest.json field {key!r} must be an object")
    return v


def _build(cls, d: Any, tuples: tuple[str, ...] = ()):
    if not isinstance(d, dict):
        raise BundleError(f"manifest.json: expected an object for {cls.__name__}, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in hints:
            continue
        if k in tuples and isinstance(v, list):
            v = tuple(v)
        if not _has_type(v, hints[k]):
            shown = json.dumps(v)[:60] if _jsonable(v) else repr(v)[:60]
            raise BundleError(f"manifest.json: {cls.__name__}.{k} must be {_type_name(hints[k])}, got {shown}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise BundleError(f"manifest.json: bad {cls.__name__}: {e}") from None


def _has_type(v: Any, tp: Any) -> bool:
    """``v`` (from JSON) fits the annotation ``tp``: ints are not bools, floats are finite numbers."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(x, args[0]) for x in v)
        return len(v) == len(args) and all(_has_type(x, a) for x, a in zip(v, args))
    if origin is list:
        return isinstance(v, list) and all(_has_type(x, args[0]) for x in v)
    if origin is dict:
        return isinstance(v, dict) and all(_has_type(k, args[0]) and _has_type(x, args[1]) for k, x in v.items())
    return isinstance(v, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return "a number" if tp is float else f"{'an' if tp is int else 'a'} {tp.__name__}"
    return str(tp).replace("typing.", "")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def load_manifest(bundle: str | Path, *, verify: bool = True) -> Manifest:
    """Read and validate ``bundle/manifest.json``; with ``verify`` check every file's size and sha256."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}: not a blip2-export bundle (or an interrupted export)")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes; a manifest is never over "
                              f"{MAX_MANIFEST_BYTES} (is this the right file?)")
        raw = json.loads(BundleFiles(bundle, verify=False).read(MANIFEST_NAME, None, limit=MAX_MANIFEST_BYTES,
                                                                what="manifest").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of thousands of digits (Python's int conversion limit)
        raise BundleError(f"{path} is not a manifest: {str(e).splitlines()[0][:120]}") from None
    except RecursionError:
        raise BundleError(f"{path} is not a manifest: its JSON is nested too deeply") from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None
    m = Manifest.from_json(raw)
    verify_files(bundle, m, verify=verify)  # names resolve inside the bundle even without verify
    return m


def graph_files(g: GraphRecord):
    """(file name, sha256, size or None) of a graph: the ONNX file, its external data and engines."""
    yield g.file, g.sha256, None
    for ext in g.external_data:
        yield ext.file, ext.sha256, ext.bytes
    for e in g.engines:
        yield e.file, e.sha256, None


def iter_files(m: Manifest, precisions=None):
    """Every (file name, sha256, size or None) the manifest vouches for; with ``precisions``, the shared
    files and the graphs of those precisions only."""
    for rec in m.files.values():
        yield rec.file, rec.sha256, rec.bytes
    for prec, graphs in m.graphs.items():
        if precisions is None or prec in precisions:
            for g in graphs.values():
                yield from graph_files(g)


def verify_files(bundle: Path, m: Manifest, *, verify: bool = True) -> None:
    """Every listed file is a plain name of a regular file in the bundle; with ``verify`` each distinct file
    is hashed once against its record."""
    BundleFiles(bundle, verify=verify).verify_all(iter_files(m))


def check_sizes(bundle: Path, g: GraphRecord) -> None:
    """The files of ``g`` whose size the manifest records have that size (a stat, nothing read)."""
    files = BundleFiles(bundle, verify=False)
    for name, _, size in graph_files(g):
        if size is not None and (n := files.size(name)) != size:
            raise BundleError(f"bundle file {printable(name)} has {n} bytes, the manifest says {size}: it was "
                              "truncated or modified", hint="re-export the bundle")


def file_record(bundle: Path, name: str) -> FileRecord:
    p = Path(bundle) / name
    return FileRecord(name, sha256_file(p), p.stat().st_size)
