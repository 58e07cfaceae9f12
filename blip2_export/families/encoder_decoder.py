"""Encoder-decoder LLMs (Flan-T5): ``vision`` and ``qformer`` as for every BLIP-2, then ``encoder`` over
[visual prefix ; prompt embeddings], ``cross_kv`` (the decoder's cross-attention keys/values, computed once
per input) and ``seq2seq_decoder`` (one step against the self-attention cache and the given cross k/v)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from blip2_export.families.base import GraphPlan
from blip2_export.families.generative import GenerativeFamily
from blip2_export.graphs import QFormerGraph, VisionGraph
from blip2_export.graphs_seq2seq import CrossKVGraph, EncoderGraph, Seq2SeqDecoderGraph, decoder_embeddings
from blip2_export.weights import ModuleWeights
from runtime import contract
from runtime.contract import Family, GraphName
from runtime.errors import Blip2Error
from runtime.manifest import DimRange, ModelFacts, file_record


class EncoderDecoderFamily(GenerativeFamily):
    family = Family.ENCODER_DECODER
    trace_sizes: ClassVar[dict[str, int]] = {"batch": 2, "enc_seq": 6, "seq": 3, "past": 4, "total": 7}

    def matches(self, model) -> bool:
        return getattr(model.config, "use_decoder_only_language_model", None) is False

    def check(self, facts: ModelFacts) -> None:
        if facts.decoder_start_token_id is None:
            raise Blip2Error("the T5 config has no decoder_start_token_id; set it in the checkpoint's text_config")

    def dims(self, facts: ModelFacts, max_batch: int) -> dict[str, DimRange]:
        ctx = facts.max_context
        return {
            "batch": DimRange(1, 1, max_batch),
            "enc_seq": DimRange(1, facts.num_query_tokens + 16, ctx),  # visual prefix + prompt
            "seq": DimRange(1, 1, 1),  # the decoder runs one position per call (decoder_start, then each token)
            "past": DimRange(0, 16, ctx - 1),  # decoder positions already cached
            "total": DimRange(1, 17, ctx),
        }

    def plan(self, model, facts: ModelFacts) -> list[GraphPlan]:
        m, lm = facts, model.language_model
        return [
            GraphPlan(GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
            GraphPlan(GraphName.QFORMER, QFormerGraph(model),
                      contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden)),
            GraphPlan(GraphName.ENCODER, EncoderGraph(lm), contract.encoder_io(m.llm_hidden)),
            GraphPlan(GraphName.CROSS_KV, CrossKVGraph(lm, m.llm_layers),
                      contract.cross_kv_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim)),
            GraphPlan(GraphName.SEQ2SEQ_DECODER, Seq2SeqDecoderGraph(lm, m.llm_layers),
                      contract.seq2seq_decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size)),
        ]

    def write_text(self, tmp, model, tokenizer, weights=None) -> dict:
        files = super().write_text(tmp, model, tokenizer, weights)
        dec = decoder_embeddings(model.language_model)
        if dec.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            # An untied decoder table (no T5 we know has one) travels beside the shared one.
            np.save(tmp / "decoder_embed_tokens.npy", (weights or ModuleWeights()).array(dec), allow_pickle=False)
            files["decoder_embed_tokens"] = file_record(tmp, "decoder_embed_tokens.npy")
        return files

    def eager_special_ids(self, facts: ModelFacts) -> dict:
        return {**super().eager_special_ids(facts), "decoder_start_token_id": facts.decoder_start_token_id}

    def eager_new_tokens(self, output_ids: list[int], input_len: int) -> list[int]:
        return output_ids[1:]  # generate returns [decoder_start, new tokens...]

    def eager_forced_logits(self, model, prefix_ref, text_ids, ref, facts) -> np.ndarray:
        lm = model.language_model
        with torch.no_grad():
            embeds = torch.cat([prefix_ref, model.get_input_embeddings()(torch.tensor([list(text_ids)]))], dim=1)
            dec_ids = torch.tensor([[facts.decoder_start_token_id] + ref[:-1]], dtype=torch.long)
            return lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      decoder_input_ids=dec_ids).logits[0].float().numpy()
