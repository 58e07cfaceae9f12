"""Checkpoint -> bundle: split a BLIP-2 model into graphs, export ONNX, write the manifest.

One loop for every family (:mod:`blip2_export.families`: the adapter says which graphs, their IO and
dims, the text side and the engines made at export). The bundle is assembled in a hidden temporary
folder next to the output and renamed into place only when every file and the manifest are written, so
an interrupted export never leaves a complete-looking bundle.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from blip2_export.bundle_writer import (  # ExportConfig & co. are part of this module's public API too
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    ExportConfig,
    export_graph,
    preprocess_facts,
    progress_bar,
    write_manifest,
)
from blip2_export.families import generation_ids, load_for_export, model_facts
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory

__all__ = ["DEFAULT_EXTERNAL_DATA_THRESHOLD", "ExportConfig", "export_bundle", "generation_ids", "model_facts",
           "preprocess_facts"]


def export_bundle(checkpoint: str | Path | None, out: str | Path, config: ExportConfig | None = None, *,
                  progress: bool = True, model_and_tokenizer=None) -> Path:
    """Export ``checkpoint`` (a local transformers BLIP-2 folder: captioning with an OPT/LLaMA-style or T5
    LLM, or the stage-1 retrieval model) to a bundle at ``out``.

    ``model_and_tokenizer`` may pass an already loaded ``(model, tokenizer, image_processor)``.
    """
    config = config or ExportConfig()
    out = Path(out)
    if out.exists() and not config.force:
        raise Blip2Error(f"output {out} already exists", hint="pass --force to replace it")
    # weights: read from the checkpoint one tensor at a time as each graph is written (blip2_export.weights)
    family, (model, tokenizer, image_processor), weights = load_for_export(checkpoint, model_and_tokenizer)
    facts = family.facts(model, tokenizer)
    config.validate(facts.max_context, family.visual_tokens(facts))
    family.check(facts)
    facts = family.limit_context(facts, config.max_context)
    model = model.float().eval()
    dims = family.dims(facts, config.max_batch)
    with atomic_directory(out, force=config.force) as tmp:
        graphs = {}
        for plan in progress_bar(family.plan(model, facts), progress, "export"):
            graphs[plan.name.value] = export_graph(tmp, plan.name, plan.module, plan.io, family.trace_sizes, config,
                                                   weights)
        graphs = family.attach_engines(tmp, graphs, facts, config, warnings.warn)
        files = family.write_text(tmp, model, tokenizer, weights)
        write_manifest(tmp, checkpoint=checkpoint, facts=facts, image_processor=image_processor, dims=dims,
                       graphs=graphs, files=files, config=config, generation=family.generation(config))
    return out
