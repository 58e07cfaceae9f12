"""The generative BLIP-2 families (``Blip2ForConditionalGeneration``): facts and special ids as transformers
reads them, shared by the decoder-only and the encoder-decoder adapters."""

from __future__ import annotations

from blip2_export.bundle_writer import write_text_side
from blip2_export.families.base import FamilyAdapter
from runtime.contract import Family
from runtime.errors import Blip2Error
from runtime.manifest import ModelFacts


def _first(*values):
    return next((v for v in values if v is not None), None)


def generation_ids(model, tokenizer) -> dict:
    """bos / eos / pad / decoder_start ids as ``Blip2ForConditionalGeneration.generate`` uses them.

    ``generate`` hands over to ``language_model.generate``, whose generation config transformers derives
    from ``text_config``; the checkpoint's own generation_config.json fills what that leaves unset (a
    Flan-T5 whose ``decoder_start_token_id`` lives only there), then the tokenizer's specials. A T5 config
    from transformers' defaults has no ``bos_token_id`` at all: every read tolerates a missing field.
    """
    t = model.config.text_config
    lm = getattr(model.language_model, "generation_config", None)
    top = getattr(model, "generation_config", None)

    def pick(field: str, tokenizer_value=None):
        return _first(getattr(lm, field, None), getattr(top, field, None), getattr(t, field, None),
                      tokenizer_value)

    eos = pick("eos_token_id", tokenizer.eos_token_id)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    bos = pick("bos_token_id", tokenizer.bos_token_id)
    pad = pick("pad_token_id", tokenizer.pad_token_id)
    start = None
    if not model.config.use_decoder_only_language_model:
        start = pick("decoder_start_token_id")
        start = start if start is not None else bos  # generate falls back to bos as transformers does
        if start is None:
            raise Blip2Error("the Flan-T5 checkpoint has no decoder_start_token_id (nor bos_token_id), so "
                             "generate cannot start decoding",
                             hint="set text_config.decoder_start_token_id (0, the pad id, for T5) in config.json")
    if not eos_ids:
        raise Blip2Error("the checkpoint has no eos_token_id (text_config, generation_config.json or the "
                         "tokenizer's eos_token)", hint="set text_config.eos_token_id in config.json")
    return {"bos": None if bos is None else int(bos), "eos": eos_ids, "pad": 0 if pad is None else int(pad),
            "decoder_start": None if start is None else int(start)}


def model_facts(model, tokenizer) -> ModelFacts:
    """Facts of a ``Blip2ForConditionalGeneration`` (either LLM family), read as transformers reads them:
    query heads and key/value heads separately (``num_key_value_heads``), head_dim where the config has one."""
    cfg = model.config
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    decoder_only = cfg.use_decoder_only_language_model
    patches = (v.image_size // v.patch_size) ** 2 + 1
    heads = t.num_attention_heads if decoder_only else t.num_heads
    hidden = t.hidden_size if decoder_only else t.d_model
    head_dim = getattr(t, "head_dim", None) or (hidden // heads if decoder_only else t.d_kv)
    kv_heads = getattr(t, "num_key_value_heads", None) or heads
    limit = getattr(t, "max_position_embeddings", None) or 512
    emb_width = model.get_input_embeddings().weight.shape[1]
    if emb_width != hidden:  # OPT-350m style word_embed_proj_dim: BLIP-2's projection feeds hidden_size
        raise Blip2Error(f"text_config.word_embed_proj_dim {emb_width} differs from hidden_size {hidden}: "
                         "BLIP-2's language_projection writes hidden_size-wide embeddings",
                         hint="a BLIP-2 OPT needs word_embed_proj_dim == hidden_size")
    vocab = model.get_output_embeddings().weight.shape[0]
    image_id = cfg.image_token_index
    if image_id is None or not 0 <= image_id < model.get_input_embeddings().weight.shape[0]:
        raise Blip2Error(f"image_token_index {image_id} is not a row of the {vocab}-token embedding table",
                         hint="set image_token_index in config.json to the tokenizer's <image> id")
    ids = generation_ids(model, tokenizer)
    return ModelFacts(
        family=(Family.DECODER_ONLY if decoder_only else Family.ENCODER_DECODER).value,
        llm_type=t.model_type,
        num_query_tokens=cfg.num_query_tokens,
        image_size=v.image_size,
        patches=patches,
        vision_hidden=v.hidden_size,
        qformer_hidden=q.hidden_size,
        llm_hidden=hidden,
        llm_layers=t.num_hidden_layers if decoder_only else t.num_decoder_layers,
        llm_heads=kv_heads,
        llm_query_heads=heads if heads != kv_heads else None,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=limit,
        bos_token_id=ids["bos"],
        eos_token_ids=ids["eos"],
        pad_token_id=ids["pad"],
        image_token_id=image_id,
        decoder_start_token_id=ids["decoder_start"],
    )


class GenerativeFamily(FamilyAdapter):
    """``Blip2ForConditionalGeneration`` checkpoints: loaded the standard way, text side = embedding table +
    tokenizer."""


    def facts(self, model, tokenizer) -> ModelFacts:
        return model_facts(model, tokenizer)

    def write_text(self, tmp, model, tokenizer, weights=None) -> dict:
        return write_text_side(tmp, model, tokenizer, weights)
