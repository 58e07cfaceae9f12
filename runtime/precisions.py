"""The precision registry: one declaration per precision, read by everything that spells a precision.

A precision is a set of graph transforms (one per graph role), the IO dtype its graphs take, whether
calibration data is needed, the parity thresholds it must pass, and what the ORT and TensorRT engine
builds make of its graphs. The CLI's ``--precision`` choices and help, manifest validation,
``engines.build``, ``blip2_export.parity`` and ``blip2_export.bench`` all read :data:`PRECISIONS`;
``engines.build`` maps each :class:`Transform` name to the function that performs it.

Adding a precision = one :class:`PrecisionSpec` here (and a :class:`Transform` if it needs a new one,
with its function registered in ``engines.build.TRANSFORM_FUNCS``).

Data only: no onnx, no engines import (the runtime validates manifests with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from runtime.contract import GraphName
from runtime.errors import Blip2Error


class Role(str, Enum):
    """What a graph does, which decides how a precision transforms it."""

    VISION = "vision"
    QFORMER = "qformer"
    LLM = "llm"  # decoder-only step, or the T5 encoder / cross K/V / decoder
    RETRIEVAL = "retrieval"  # stage-1 heads: image features, text features, ITM


ROLE_OF: dict[GraphName, Role] = {
    GraphName.VISION: Role.VISION, GraphName.QFORMER: Role.QFORMER,
    GraphName.DECODER: Role.LLM, GraphName.ENCODER: Role.LLM, GraphName.SEQ2SEQ_DECODER: Role.LLM,
    GraphName.CROSS_KV: Role.LLM,
    GraphName.IMAGE_FEATURES: Role.RETRIEVAL, GraphName.TEXT_FEATURES: Role.RETRIEVAL, GraphName.ITM: Role.RETRIEVAL,
}


def role_of(graph: str | GraphName) -> Role:
    return ROLE_OF[GraphName(graph)]


@dataclass(frozen=True)
class Transform:
    """One ONNX-graph transform. ``ort_engine``: the ORT engine build a (non-decoder) graph of this
    transform gets: ``"qdq"`` (calibrated int8 activation pairs in uint8), ``"weights"`` (weight-only
    layers lowered to MatMulNBits) or None. Decoders always get the decoder engine."""

    name: str
    summary: str
    calibrated: bool = False  # needs calibration data (activation ranges, or activation statistics)
    ort_engine: str | None = None
    int8_activations: bool = False  # its products take int8 activations (the CPU weight-form choice applies)
    int4_weights: bool = False  # int4 blocks behind DequantizeLinear, which ORT fuses into MatMulNBits at load


TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform("none", "the exported fp32 graph"),
    Transform("fp16", "fp16 weights and compute, fp32 islands (LayerNorm, softmax, Q-Former compute, logits)"),
    Transform("int8-static", "Q/DQ int8 activations (calibrated ranges) x per-channel int8 weights",
              calibrated=True, ort_engine="qdq", int8_activations=True),
    Transform("int8-weight", "weight-only int8, per output channel; activations float", ort_engine="weights"),
    Transform("int4-gptq", "weight-only int4 in blocks along K, one scale per block, codes chosen with GPTQ error "
                           "feedback on calibration activations; activations float",
              calibrated=True, ort_engine="weights", int4_weights=True),
    Transform("int4-rtn", "weight-only int4 in blocks along K, one scale per block, plain rounding; activations "
                          "float", ort_engine="weights", int4_weights=True),
)}


@dataclass(frozen=True)
class ParityThresholds:
    """What ``blip2-export parity`` requires of a precision against the eager fp32 model."""

    stage_max_abs: float | None  # vision / prefix max abs diff (None: not checked)
    stage_cosine: float  # minimum cosine similarity per stage
    token_agreement: float  # minimum fraction of generated tokens equal to eager's
    forced_top1: float | None = None  # minimum top-1 agreement along eager's tokens (teacher-forced); None: reported


@dataclass(frozen=True)
class EngineRecipe:
    """What a backend builds from a precision's graphs."""

    buildable: bool  # ``blip2-export build --precision P --backend B`` has work to do
    summary: str


@dataclass(frozen=True)
class RoleChoice:
    """A build option that picks a role's transform: ``BuildConfig.<field>`` value -> transform name."""

    field: str
    flag: str
    values: Mapping[str, str]


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    summary: str  # one line for --help
    io_dtype: str  # float IO of its graphs (the contract's dtype parameter)
    transforms: Mapping[Role, str]  # default transform per graph role
    parity: ParityThresholds
    ort: EngineRecipe
    trt: EngineRecipe
    choices: Mapping[Role, RoleChoice] = field(default_factory=dict)  # roles whose transform a flag picks
    flags: tuple[str, ...] = ()  # build flags that apply to this precision
    # the LLM's input embedding table at this precision: None = the bundle's shared float32 table; a
    # dtype = a table of its own in that type (manifest files role ``embed_tokens.<precision>``)
    table_dtype: str | None = None

    def transform_names(self, role: Role) -> tuple[str, ...]:
        """Every transform a graph of ``role`` may have at this precision (the default first)."""
        names = [self.transforms[role]]
        c = self.choices.get(role)
        if c is not None:
            names += [t for t in c.values.values() if t not in names]
        return tuple(names)

    def transform_for(self, graph: str | GraphName, options: object = None) -> Transform:
        """The transform of ``graph`` at this precision; ``options`` (a BuildConfig) may pick another
        where :attr:`choices` lets a flag choose."""
        role = role_of(graph)
        c = self.choices.get(role)
        if c is not None and options is not None:
            value = getattr(options, c.field)
            if value not in c.values:
                raise Blip2Error(f"{c.flag} {value!r} is not one of {', '.join(c.values)}")
            return TRANSFORMS[c.values[value]]
        return TRANSFORMS[self.transforms[role]]

    def needs_calibration(self, graphs: list[str], options: object = None) -> list[str]:
        return [g for g in graphs if self.transform_for(g, options).calibrated]

    def backends(self) -> tuple[str, ...]:
        return tuple(b for b, r in (("ort", self.ort), ("trt", self.trt)) if r.buildable)


_QUANT_VISION = {Role.VISION: "int8-static", Role.QFORMER: "int8-static", Role.RETRIEVAL: "int8-static"}
_INT4_VISION = RoleChoice("int4_vision", "--int4-vision", {"int8": "int8-static", "fp16": "fp16"})

PRECISIONS: dict[str, PrecisionSpec] = {p.name: p for p in (
    PrecisionSpec(
        "fp32", "the exported graphs (exact); build only makes TensorRT engines of them",
        "float32", {r: "none" for r in Role},
        ParityThresholds(stage_max_abs=1e-4, stage_cosine=0.99999, token_agreement=1.0),
        ort=EngineRecipe(False, "the exported graphs and their decoder engine, made at export"),
        trt=EngineRecipe(True, "fp32 engines from the exported graphs"),
    ),
    PrecisionSpec(
        "fp16", "fp16 weights/compute with fp32 islands (LayerNorm, softmax, Q-Former, logits)",
        "float16", {r: "fp16" for r in Role},
        ParityThresholds(stage_max_abs=None, stage_cosine=0.999, token_agreement=0.95),
        ort=EngineRecipe(True, "the fp16 graphs, decoder with fused attention (GPU EPs; x86 CPUs run fp16 as fp32)"),
        trt=EngineRecipe(True, "strongly typed fp16 engines"),
    ),
    PrecisionSpec(
        "int8", "Q/DQ int8 from calibration (vision, Q-Former) + weight-only int8 LLM",
        "float32", {**_QUANT_VISION, Role.LLM: "int8-weight"},
        ParityThresholds(stage_max_abs=None, stage_cosine=0.98, token_agreement=0.85),
        ort=EngineRecipe(True, "uint8 activation pairs; LLM weights as MatMulNBits bits=8 (or folded); int8 KV"),
        trt=EngineRecipe(True, "strongly typed engines from the Q/DQ graphs"),
        choices={Role.LLM: RoleChoice("llm_int8", "--llm-int8", {"weight": "int8-weight", "static": "int8-static"})},
        flags=("--calib-images", "--calib-prompts", "--calib-method", "--calib-percentile", "--calib-limit", "--int8-tolerance",
               "--llm-int8", "--ort-int8", "--ort-kv-cache"),
    ),
    PrecisionSpec(
        "int4", "weight-only int4 LLM in blocks (GPTQ from calibration, or plain rounding) + int8 (or fp16) "
                "vision and Q-Former",
        "float32", {**_QUANT_VISION, Role.LLM: "int4-gptq"},
        ParityThresholds(stage_max_abs=None, stage_cosine=0.98, token_agreement=0.5, forced_top1=0.85),
        ort=EngineRecipe(True, "LLM weights as MatMulNBits bits=4, made by the runtime at load from the portable "
                               "graph's int4 weights (LM head int4 or int8); vision/Q-Former as int8"),
        trt=EngineRecipe(True, "strongly typed engines; int4 weights through blockwise DequantizeLinear (opset 21)"),
        choices={Role.VISION: _INT4_VISION, Role.QFORMER: _INT4_VISION, Role.RETRIEVAL: _INT4_VISION,
                 Role.LLM: RoleChoice("int4_method", "--int4-method", {"gptq": "int4-gptq", "rtn": "int4-rtn"})},
        flags=("--calib-images", "--calib-prompts", "--calib-method", "--calib-percentile", "--calib-limit", "--int8-tolerance",
               "--int4-block", "--int4-method", "--int4-lm-head", "--int4-vision", "--ort-kv-cache"),
        table_dtype="float16",  # prompt embeddings: rounding far below int4's; half the bytes on disk and in RAM
    ),
)}

PRECISION_NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get(name: str) -> PrecisionSpec:
    if name not in PRECISIONS:
        raise Blip2Error(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def help_text(prefix: str = "") -> str:
    """``--precision`` help, generated from the registry."""
    return prefix + " ".join(f"{p.name}: {p.summary}." for p in PRECISIONS.values())


def legacy_transform(precision: str, graph: str, notes: Mapping) -> str:
    """The transform of a graph recorded before manifests named it (read from its notes)."""
    if precision == "fp32":
        return "none"
    if precision == "fp16" or notes.get("transform") == "fp16":
        return "fp16"
    if notes.get("transform") == "int8":
        return "int8-static" if notes.get("recipe") == "static" else "int8-weight"
    return PRECISIONS[precision].transforms[role_of(graph)] if precision in PRECISIONS else ""
