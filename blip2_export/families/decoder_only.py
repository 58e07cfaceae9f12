"""Decoder-only LLMs (OPT, and causal LMs transformers builds the same way, e.g. LLaMA with grouped-query
attention): ``vision``, ``qformer`` and one ``decoder`` graph over inputs_embeds with a KV cache."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from blip2_export.families.base import GraphPlan
from blip2_export.families.generative import GenerativeFamily
from blip2_export.graphs import DecoderGraph, QFormerGraph, VisionGraph
from engines.ort_optimize import attach_ort_engine
from runtime import contract
from runtime.contract import Family, GraphName
from runtime.manifest import DimRange, ModelFacts


class DecoderOnlyFamily(GenerativeFamily):
    family = Family.DECODER_ONLY
    trace_sizes: ClassVar[dict[str, int]] = {"batch": 2, "seq": 5, "past": 3, "total": 8}

    def matches(self, model) -> bool:
        return bool(getattr(model.config, "use_decoder_only_language_model", False))

    def dims(self, facts: ModelFacts, max_batch: int) -> dict[str, DimRange]:
        q, ctx = facts.num_query_tokens, facts.max_context
        return {
            "batch": DimRange(1, 1, max_batch),
            "seq": DimRange(1, q + 16, ctx),
            "past": DimRange(0, q + 16, ctx - 1),
            "total": DimRange(1, q + 32, ctx),
        }

    def plan(self, model, facts: ModelFacts) -> list[GraphPlan]:
        m = facts
        return [
            GraphPlan(GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
            GraphPlan(GraphName.QFORMER, QFormerGraph(model),
                      contract.qformer_io(m.patches, m.vision_hidden, m.num_query_tokens, m.llm_hidden)),
            GraphPlan(GraphName.DECODER, DecoderGraph(model.language_model, m.llm_layers),
                      contract.decoder_io(m.llm_hidden, m.llm_layers, m.llm_heads, m.head_dim, m.vocab_size)),
        ]

    def attach_engines(self, tmp, graphs, facts, config, warn):
        if config.ort_engine:  # the decoder's ORT engine: fused attention, in-place KV cache
            name = GraphName.DECODER.value
            graphs = {**graphs, name: attach_ort_engine(tmp, graphs[name], facts, warn=warn)}
        return graphs

    def eager_new_tokens(self, output_ids: list[int], input_len: int) -> list[int]:
        return output_ids[input_len:]  # generate returns the prompt, then the new tokens

    def eager_forced_logits(self, model, prefix_ref, text_ids, ref, facts) -> np.ndarray:
        emb = model.get_input_embeddings()
        with torch.no_grad():
            forced = torch.tensor([list(text_ids) + ref[:-1]], dtype=torch.long)
            embeds = torch.cat([prefix_ref, emb(forced)], dim=1)
            logits = model.language_model(inputs_embeds=embeds,
                                          attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
        start = prefix_ref.shape[1] + len(text_ids) - 1
        return logits[0, start:].float().numpy()
