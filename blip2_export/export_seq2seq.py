"""Checkpoint -> bundle for BLIP-2 with an encoder-decoder LLM (Flan-T5).

Graphs: ``vision`` and ``qformer`` as for every BLIP-2, then ``encoder`` over [visual prefix ;
prompt embeddings], ``cross_kv`` (the decoder's cross-attention keys/values, computed once per input)
and ``seq2seq_decoder`` (one step against the self-attention cache and the given cross k/v). IO comes
from ``runtime.contract``; the rest of the bundle (embedding table, tokenizer, manifest, atomic
write) is shared with the decoder-only exporter in :mod:`blip2_export.export`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime import contract
from runtime.contract import Family, GraphName
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory
from runtime.manifest import DimRange, GenerationDefaults, ModelFacts, file_record

# Example sizes the graphs are traced at; every symbolic dim differs so none is baked in as a constant.
TRACE_SIZES = {"batch": 2, "enc_seq": 6, "seq": 3, "past": 4, "total": 7}


def export_bundle_seq2seq(checkpoint, out: Path, config, model, tokenizer, image_processor, facts: ModelFacts,
                          *, progress: bool = True, weights=None) -> Path:
    """Export the T5-family graphs; ``weights`` as for :func:`blip2_export.bundle_writer.export_onnx`."""

    from blip2_export.bundle_writer import export_graph, progress_bar, write_manifest, write_text_side
    from blip2_export.graphs import QFormerGraph, VisionGraph
    from blip2_export.graphs_seq2seq import (
        CrossKVGraph,
        EncoderGraph,
        Seq2SeqDecoderGraph,
        decoder_embeddings,
    )

    if facts.family != Family.ENCODER_DECODER.value:
        raise Blip2Error(f"export_bundle_seq2seq got a {facts.family} model")
    if facts.decoder_start_token_id is None:
        raise Blip2Error("the T5 config has no decoder_start_token_id; set it in the checkpoint's text_config")
    max_ctx = min(config.max_context or facts.max_context, facts.max_context)
    facts = dataclasses.replace(facts, max_context=max_ctx)
    model = model.float().eval()
    lm = model.language_model
    m = facts
    dims = {
        "batch": DimRange(1, 1, config.max_batch),
        "enc_seq": DimRange(1, m.num_query_tokens + 16, max_ctx),  # visual prefix + prompt
        "seq": DimRange(1, 1, 1),  # the decoder runs one position per call (decoder_start, then each token)
        "past": DimRange(0, 16, max_ctx - 1),  # decoder positions already cached
        "total": DimRange(1, 17, max_ctx),
    }
    plans = [
        (GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
        (GraphName.QFORMER, QFormerGraph(model),
         contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden)),
        (GraphName.ENCODER, EncoderGraph(lm), contract.encoder_io(m.llm_hidden)),
        (GraphName.CROSS_KV, CrossKVGraph(lm, m.llm_layers),
         contract.cross_kv_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim)),
        (GraphName.SEQ2SEQ_DECODER, Seq2SeqDecoderGraph(lm, m.llm_layers),
         contract.seq2seq_decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size)),
    ]
    with atomic_directory(out, force=config.force) as tmp:
        graphs = {}
        for name, module, io in progress_bar(plans, progress, "export"):
            graphs[name.value] = export_graph(tmp, name, module, io, TRACE_SIZES, config, weights)
        files = write_text_side(tmp, model, tokenizer, weights)
        dec = decoder_embeddings(lm)
        if dec.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            # An untied decoder table (no T5 we know has one) travels beside the shared one.
            from blip2_export.weights import ModuleWeights

            np.save(tmp / "decoder_embed_tokens.npy", (weights or ModuleWeights()).array(dec), allow_pickle=False)
            files["decoder_embed_tokens"] = file_record(tmp, "decoder_embed_tokens.npy")
        write_manifest(tmp, checkpoint=checkpoint, facts=facts, image_processor=image_processor, dims=dims,
                       graphs=graphs, files=files, config=config, generation=GenerationDefaults(max_new_tokens=config.max_new_tokens))
    return out
