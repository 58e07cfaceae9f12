"""Checkpoint -> bundle: split a BLIP-2 model into graphs, export ONNX, write the manifest.

The bundle is assembled in a hidden temporary folder next to the output and renamed into place
only when every file and the manifest are written, so an interrupted export never leaves a
complete-looking bundle.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from blip2_export.bundle_writer import (  # ExportConfig & co. are part of this module's public API too
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    ExportConfig,
    export_graph,
    preprocess_facts,
    progress_bar,
    write_manifest,
    write_text_side,
)
from runtime import contract
from runtime.contract import Family, GraphIO, GraphName
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory
from runtime.manifest import DimRange, GenerationDefaults, ModelFacts

__all__ = ["DEFAULT_EXTERNAL_DATA_THRESHOLD", "ExportConfig", "export_bundle", "generation_ids", "model_facts",
           "preprocess_facts"]


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
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=limit,
        bos_token_id=ids["bos"],
        eos_token_ids=ids["eos"],
        pad_token_id=ids["pad"],
        image_token_id=image_id,
        decoder_start_token_id=ids["decoder_start"],
    )


def export_bundle(checkpoint: str | Path, out: str | Path, config: ExportConfig | None = None, *,
                  progress: bool = True, model_and_tokenizer=None) -> Path:
    """Export ``checkpoint`` (a local transformers BLIP-2 folder) to a bundle at ``out``.

    ``model_and_tokenizer`` may pass an already loaded ``(model, tokenizer, image_processor)``.
    """
    import torch

    from blip2_export.graphs import DecoderGraph, QFormerGraph, VisionGraph
    from blip2_export.modelzoo import load_checkpoint_lazy

    config = config or ExportConfig()
    out = Path(out)
    if out.exists() and not config.force:
        raise Blip2Error(f"output {out} already exists", hint="pass --force to replace it")
    from blip2_export.modelzoo import RETRIEVAL_ARCHITECTURE, is_retrieval_checkpoint

    if (type(model_and_tokenizer[0]).__name__ == RETRIEVAL_ARCHITECTURE if model_and_tokenizer is not None
            else checkpoint is not None and is_retrieval_checkpoint(checkpoint)):
        from blip2_export.export_retrieval import export_bundle_retrieval  # stage-1 model: ITC / ITM graphs

        return export_bundle_retrieval(checkpoint, out, config, progress=progress,
                                       model_and_tokenizer=model_and_tokenizer)
    if model_and_tokenizer is None:  # weights stay on disk until each graph's external data is written
        model, tokenizer, image_processor, weights = load_checkpoint_lazy(checkpoint)
    else:
        (model, tokenizer, image_processor), weights = model_and_tokenizer, None
    facts = model_facts(model, tokenizer)
    config.validate(facts.max_context, facts.num_query_tokens)
    if facts.family != Family.DECODER_ONLY.value:
        from blip2_export import export_seq2seq

        return export_seq2seq.export_bundle_seq2seq(checkpoint, out, config, model, tokenizer, image_processor,
                                                    facts, progress=progress, weights=weights)
    max_ctx = min(config.max_context or facts.max_context, facts.max_context)
    facts = dataclasses.replace(facts, max_context=max_ctx)
    model = model.float().eval()

    dims = {
        "batch": DimRange(1, 1, config.max_batch),
        "seq": DimRange(1, facts.num_query_tokens + 16, max_ctx),
        "past": DimRange(0, facts.num_query_tokens + 16, max_ctx - 1),
        "total": DimRange(1, facts.num_query_tokens + 32, max_ctx),
    }
    sizes = {"batch": 2, "seq": 5, "past": 3, "total": 8}
    m = facts
    plans: list[tuple[GraphName, torch.nn.Module, GraphIO]] = [
        (GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
        (GraphName.QFORMER, QFormerGraph(model),
         contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden)),
        (GraphName.DECODER, DecoderGraph(model.language_model, m.llm_layers),
         contract.decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size)),
    ]
    with atomic_directory(out, force=config.force) as tmp:
        graphs = {}
        for name, module, io in progress_bar(plans, progress, "export"):
            graphs[name.value] = export_graph(tmp, name, module, io, sizes, config, weights)
        if config.ort_engine:
            from engines.ort_optimize import attach_ort_engine

            graphs[GraphName.DECODER.value] = attach_ort_engine(tmp, graphs[GraphName.DECODER.value], facts,
                                                                warn=warnings.warn)
        files = write_text_side(tmp, model, tokenizer, weights)
        write_manifest(tmp, checkpoint=checkpoint, facts=facts, image_processor=image_processor, dims=dims,
                       graphs=graphs, files=files, config=config,
                       generation=GenerationDefaults(max_new_tokens=config.max_new_tokens))
    return out


