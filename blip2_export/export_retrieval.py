"""Checkpoint -> bundle for the stage-1 BLIP-2 model (``Blip2ForImageTextRetrieval``): ITC / ITM.

Graphs ``vision``, ``image_features``, ``text_features`` and ``itm`` (IO from ``runtime.contract``),
the Q-Former's BERT-style tokenizer, and a manifest whose family is ``retrieval``. Written through the
same atomic folder as every bundle.
"""

from __future__ import annotations

from pathlib import Path

from runtime import contract
from runtime.contract import Family, GraphName
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory
from runtime.manifest import DimRange, GenerationDefaults, ModelFacts, file_record

TRACE_SIZES = {"batch": 2, "text": 5}


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


def export_bundle_retrieval(checkpoint, out: str | Path, config, *, progress: bool = True,
                            model_and_tokenizer=None) -> Path:
    import json

    from blip2_export.bundle_writer import export_graph, progress_bar, write_manifest
    from blip2_export.graphs import VisionGraph
    from blip2_export.graphs_retrieval import ImageFeaturesGraph, ItmGraph, TextFeaturesGraph
    from blip2_export.modelzoo import load_retrieval_checkpoint

    out = Path(out)
    if out.exists() and not config.force:
        raise Blip2Error(f"output {out} already exists", hint="pass --force to replace it")
    model, tokenizer, image_processor = model_and_tokenizer or load_retrieval_checkpoint(checkpoint)
    model = model.float().eval()
    facts = retrieval_facts(model, tokenizer)
    config.validate(facts.max_context, 0)
    max_text = min(config.max_context or facts.max_context, facts.max_context)
    facts = _replace_facts(facts, max_context=max_text)
    m = facts
    dims = {
        "batch": DimRange(1, 1, config.max_batch),  # images, texts, or (image, text) pairs for itm
        "text": DimRange(1, min(32, max_text), max_text),
    }
    plans = [
        (GraphName.VISION, VisionGraph(model), contract.vision_io(m.image_size, m.patches, m.vision_hidden)),
        (GraphName.IMAGE_FEATURES, ImageFeaturesGraph(model),
         contract.image_features_io(m.patches, m.vision_hidden, m.num_query_tokens, m.embed_dim)),
        (GraphName.TEXT_FEATURES, TextFeaturesGraph(model), contract.text_features_io(m.embed_dim)),
        (GraphName.ITM, ItmGraph(model), contract.itm_io(m.patches, m.vision_hidden)),
    ]
    with atomic_directory(out, force=config.force) as tmp:
        graphs = {}
        for name, module, io in progress_bar(plans, progress, "export"):
            graphs[name.value] = export_graph(tmp, name, module, io, TRACE_SIZES, config)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        special = {"cls_token": tokenizer.cls_token or tokenizer.bos_token,
                   "sep_token": tokenizer.sep_token or tokenizer.eos_token,
                   "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
        (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
        files = {"tokenizer": file_record(tmp, "tokenizer.json"),
                 "tokenizer_config": file_record(tmp, "tokenizer_config.json")}
        write_manifest(tmp, checkpoint=checkpoint, facts=facts, image_processor=image_processor, dims=dims,
                       graphs=graphs, files=files, config=config, generation=GenerationDefaults())
    return out


def _replace_facts(facts: ModelFacts, **kw) -> ModelFacts:
    import dataclasses

    return dataclasses.replace(facts, **kw)
