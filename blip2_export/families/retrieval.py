"""The stage-1 BLIP-2 model (``Blip2ForImageTextRetrieval``): ITC / ITM graphs for edge retrieval.

Graphs ``vision``, ``image_features``, ``text_features`` and ``itm`` (IO from ``runtime.contract``), the
Q-Former's BERT-style tokenizer, and a manifest whose family is ``retrieval``. Its parity is
:func:`blip2_export.parity.run_retrieval_parity` (rankings, not generations).
"""

from __future__ import annotations

import json
from typing import ClassVar

from blip2_export.families.base import FamilyAdapter, GraphPlan
from blip2_export.graphs import VisionGraph
from blip2_export.graphs_retrieval import ImageFeaturesGraph, ItmGraph, TextFeaturesGraph
from blip2_export.modelzoo import RETRIEVAL_ARCHITECTURE, is_retrieval_checkpoint, load_retrieval_checkpoint
from runtime import contract
from runtime.contract import Family, GraphName
from runtime.manifest import DimRange, GenerationDefaults, ModelFacts, file_record


def retrieval_facts(model, tokenizer) -> ModelFacts:
    cfg = model.config
    v, q = cfg.vision_config, cfg.qformer_config
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (q.pad_token_id or 0)
    return ModelFacts(
        family=Family.RETRIEVAL.value,
        llm_type="qformer",  # the text side is the Q-Former's own BERT-style encoder
        num_query_tokens=cfg.num_query_tokens,
        image_size=v.image_size,
        patches=(v.image_size // v.patch_size) ** 2 + 1,
        vision_hidden=v.hidden_size,
        qformer_hidden=q.hidden_size,
        llm_hidden=q.hidden_size,
        llm_layers=q.num_hidden_layers,
        llm_heads=q.num_attention_heads,
        head_dim=q.hidden_size // q.num_attention_heads,
        vocab_size=q.vocab_size,
        max_context=q.max_position_embeddings,
        bos_token_id=cls_id,
        eos_token_ids=(int(sep_id),) if sep_id is not None else (),
        pad_token_id=int(pad),
        image_token_id=cfg.image_token_index,
        embed_dim=cfg.image_text_hidden_size,
    )


class RetrievalFamily(FamilyAdapter):
    family = Family.RETRIEVAL
    trace_sizes: ClassVar[dict[str, int]] = {"batch": 2, "text": 5}

    def claims_checkpoint(self, path) -> bool:
        return is_retrieval_checkpoint(path)

    def load(self, path, lazy: bool = True):
        return (*load_retrieval_checkpoint(path), None)  # loaded whole: the stage-1 model is small

    def matches(self, model) -> bool:
        return type(model).__name__ == RETRIEVAL_ARCHITECTURE

    def facts(self, model, tokenizer) -> ModelFacts:
        return retrieval_facts(model, tokenizer)

    def visual_tokens(self, facts: ModelFacts) -> int:
        return 0  # the context is the text's own (max_context counts text tokens)

    def dims(self, facts: ModelFacts, max_batch: int) -> dict[str, DimRange]:
        return {
            "batch": DimRange(1, 1, max_batch),  # images, texts, or (image, text) pairs for itm
            "text": DimRange(1, min(32, facts.max_context), facts.max_context),
        }

    def plan(self, model, facts: ModelFacts) -> list[GraphPlan]:
        m = facts
        return [
            GraphPlan(GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
            GraphPlan(GraphName.IMAGE_FEATURES, ImageFeaturesGraph(model),
                      contract.image_features_io(m.patches, m.vision_hidden, m.num_query_tokens, m.embed_dim)),
            GraphPlan(GraphName.TEXT_FEATURES, TextFeaturesGraph(model), contract.text_features_io(m.embed_dim)),
            GraphPlan(GraphName.ITM, ItmGraph(model), contract.itm_io(m.patches, m.vision_hidden)),
        ]

    def write_text(self, tmp, model, tokenizer, weights=None) -> dict:
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        special = {"cls_token": tokenizer.cls_token or tokenizer.bos_token,
                   "sep_token": tokenizer.sep_token or tokenizer.eos_token,
                   "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
        (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
        return {"tokenizer": file_record(tmp, "tokenizer.json"),
                "tokenizer_config": file_record(tmp, "tokenizer_config.json")}

    def generation(self, config) -> GenerationDefaults:
        return GenerationDefaults()
