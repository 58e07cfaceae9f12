"""Graph IO, declared once.

Every graph of a bundle has its inputs and outputs declared here: names, dtypes and symbolic dims.
The exporter builds ``torch.onnx.export`` names and dynamic axes from these declarations and writes
them into the manifest; the manifest loader checks a bundle against them; the engine builder derives
optimization profiles from them; the runtime feeds graphs by these names. Nothing else spells a graph
input name by hand.

Symbolic dims (their min/opt/max live in the manifest's ``dims``):
  batch    images (or sequences) per call
  seq      new positions fed to a decoder in one call (prompt length at prefill, 1 per decode step)
  past     positions already in the self-attention KV cache
  total    past + seq
  enc_seq  encoder sequence length (encoder-decoder LLMs)
  text     text length (retrieval graphs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class GraphName(str, Enum):
    VISION = "vision"
    QFORMER = "qformer"
    DECODER = "decoder"  # decoder-only LLM step (prefill and decode), with KV cache
    ENCODER = "encoder"  # encoder of an encoder-decoder LLM
    SEQ2SEQ_DECODER = "seq2seq_decoder"  # decoder of an encoder-decoder LLM, with self + cross KV cache
    CROSS_KV = "cross_kv"  # cross-attention keys/values computed once from the encoder output
    IMAGE_FEATURES = "image_features"  # retrieval: normalised query projections
    TEXT_FEATURES = "text_features"  # retrieval: normalised [CLS] projection
    ITM = "itm"  # retrieval: image-text matching head


class Family(str, Enum):
    DECODER_ONLY = "decoder_only"  # OPT and other causal LMs
    ENCODER_DECODER = "encoder_decoder"  # Flan-T5
    RETRIEVAL = "retrieval"  # stage-1 model: ITC / ITM


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    dims: tuple[str | int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(str(d["name"]), str(d["dtype"]), tuple(d["dims"]))


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra: dict = field(default_factory=dict)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }


def past_name(layer: int, kind: str, prefix: str = "past") -> str:
    """``past.{layer}.{key|value}``; ``prefix`` is ``present`` for outputs, ``cross`` for cross-attention."""
    return f"{prefix}.{layer}.{kind}"


def kv_specs(prefix: str, layers: int, heads: int, head_dim: int, length_dim: str, dtype: str) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(past_name(i, kind, prefix), dtype, ("batch", heads, length_dim, head_dim))
        for i in range(layers)
        for kind in ("key", "value")
    )


def vision_io(image_size: int, patches: int, vision_hidden: int, dtype: str = "float32") -> GraphIO:
    return GraphIO(
        inputs=(TensorSpec("pixel_values", dtype, ("batch", 3, image_size, image_size)),),
        outputs=(TensorSpec("image_embeds", dtype, ("batch", patches, vision_hidden)),),
    )


def qformer_io(patches: int, vision_hidden: int, num_query_tokens: int, llm_hidden: int, dtype: str = "float32") -> GraphIO:
    return GraphIO(
        inputs=(TensorSpec("image_embeds", dtype, ("batch", patches, vision_hidden)),),
        outputs=(TensorSpec("visual_prefix", dtype, ("batch", num_query_tokens, llm_hidden)),),
    )


def decoder_io(hidden: int, layers: int, heads: int, head_dim: int, vocab: int, dtype: str = "float32") -> GraphIO:
    """Decoder-only LLM: one graph for prefill (seq = prompt) and decode (seq = 1) against the cache."""
    return GraphIO(
        inputs=(
            TensorSpec("inputs_embeds", dtype, ("batch", "seq", hidden)),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            *kv_specs("past", layers, heads, head_dim, "past", dtype),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", "seq", vocab)),
            *kv_specs("present", layers, heads, head_dim, "total", dtype),
        ),
    )


def encoder_io(hidden: int, dtype: str = "float32") -> GraphIO:
    return GraphIO(
        inputs=(
            TensorSpec("inputs_embeds", dtype, ("batch", "enc_seq", hidden)),
            TensorSpec("attention_mask", "int64", ("batch", "enc_seq")),
        ),
        outputs=(TensorSpec("encoder_hidden_states", dtype, ("batch", "enc_seq", hidden)),),
    )


def cross_kv_io(hidden: int, layers: int, heads: int, head_dim: int, dtype: str = "float32") -> GraphIO:
    return GraphIO(
        inputs=(TensorSpec("encoder_hidden_states", dtype, ("batch", "enc_seq", hidden)),),
        outputs=kv_specs("cross", layers, heads, head_dim, "enc_seq", dtype),
    )


def seq2seq_decoder_io(hidden: int, layers: int, heads: int, head_dim: int, vocab: int, dtype: str = "float32") -> GraphIO:
    """Encoder-decoder LLM decoder: new decoder positions against the self-attention cache and the
    cross-attention keys/values of ``cross_kv_io`` (computed once per input, never recomputed here).

    Every row of a batch has the same decoder length (all start from decoder_start), so the absolute
    position of the new tokens, which T5's relative position bias needs, is the past length itself.
    """
    return GraphIO(
        inputs=(
            TensorSpec("decoder_inputs_embeds", dtype, ("batch", "seq", hidden)),
            TensorSpec("encoder_attention_mask", "int64", ("batch", "enc_seq")),
            *kv_specs("past", layers, heads, head_dim, "past", dtype),
            *kv_specs("cross", layers, heads, head_dim, "enc_seq", dtype),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", "seq", vocab)),
            *kv_specs("present", layers, heads, head_dim, "total", dtype),
        ),
    )


# -- retrieval (stage-1 model: ITC / ITM) ----------------------------------------------------------
def image_features_io(patches: int, vision_hidden: int, num_query_tokens: int, embed_dim: int,
                      dtype: str = "float32") -> GraphIO:
    """ViT output -> Q-Former queries -> vision projection, L2-normalised per query."""
    return GraphIO(
        inputs=(TensorSpec("image_embeds", dtype, ("batch", patches, vision_hidden)),),
        outputs=(TensorSpec("image_feats", "float32", ("batch", num_query_tokens, embed_dim)),),
    )


def text_features_io(embed_dim: int) -> GraphIO:
    """Q-Former text encoder ([CLS] first) -> text projection of [CLS], L2-normalised."""
    return GraphIO(
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "text")),
            TensorSpec("attention_mask", "int64", ("batch", "text")),
        ),
        outputs=(TensorSpec("text_feats", "float32", ("batch", embed_dim)),),
    )


def itm_io(patches: int, vision_hidden: int, dtype: str = "float32") -> GraphIO:
    """Image-text matching over (image, text) pairs: queries + text through the Q-Former, ITM head on
    the query outputs, averaged over queries -> logits [no match, match]."""
    return GraphIO(
        inputs=(
            TensorSpec("image_embeds", dtype, ("batch", patches, vision_hidden)),
            TensorSpec("input_ids", "int64", ("batch", "text")),
            TensorSpec("attention_mask", "int64", ("batch", "text")),
        ),
        outputs=(TensorSpec("itm_logits", "float32", ("batch", 2)),),
    )
