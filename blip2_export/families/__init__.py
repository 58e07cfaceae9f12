"""Model families, registered by :class:`runtime.contract.Family`: the exporter's and parity's seam.

Adding a family is one module here (a :class:`FamilyAdapter` subclass, registered below), its graph
wrappers, its IO in :mod:`runtime.contract`, and, where it generates with a new kind of graph, a step model
registered in :mod:`runtime.families` (docs/architecture.md walks through it).
"""

from __future__ import annotations

from pathlib import Path

from blip2_export.families.base import FamilyAdapter, GraphPlan
from blip2_export.families.decoder_only import DecoderOnlyFamily
from blip2_export.families.encoder_decoder import EncoderDecoderFamily
from blip2_export.families.generative import generation_ids, model_facts
from blip2_export.families.retrieval import RetrievalFamily, retrieval_facts
from blip2_export.modelzoo import load_checkpoint, load_checkpoint_lazy
from runtime.contract import Family
from runtime.errors import Blip2Error
from runtime.registry import Registry

__all__ = ["FAMILIES", "FamilyAdapter", "GraphPlan", "family_of", "generation_ids", "load_for_export",
           "model_facts", "register_family", "retrieval_facts"]

FAMILIES: Registry[Family, FamilyAdapter] = Registry("family", lambda adapter: adapter.family)


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    return FAMILIES.register(adapter)


def family_of(model) -> FamilyAdapter:
    """The adapter of a loaded model."""
    for adapter in FAMILIES.values():
        if adapter.matches(model):
            return adapter
    raise Blip2Error(f"no registered family exports a {type(model).__name__}; known: "
                     f"{', '.join(FAMILIES.names())}", hint="see docs/architecture.md: add a family")


def load_for_export(checkpoint: str | Path | None, model_and_tokenizer=None, *, lazy: bool = True):
    """``(adapter, (model, tokenizer, image_processor), weights)`` for a checkpoint folder or a loaded model.

    ``lazy`` (export): where the family can, the model's parameters are stand-ins that take no memory and
    ``weights`` (:mod:`blip2_export.weights`) reads each tensor from the checkpoint when a graph is written;
    else (parity's eager reference) the model is loaded whole and ``weights`` is None (its own tensors)."""
    if model_and_tokenizer is not None:
        return family_of(model_and_tokenizer[0]), tuple(model_and_tokenizer), None
    if checkpoint is None:
        raise Blip2Error("no checkpoint given")
    path = Path(checkpoint)
    for adapter in FAMILIES.values():
        if adapter.claims_checkpoint(path):
            model, tokenizer, processor, weights = adapter.load(path, lazy=lazy)
            return adapter, (model, tokenizer, processor), weights
    if lazy:
        model, tokenizer, processor, weights = load_checkpoint_lazy(path)
    else:
        (model, tokenizer, processor), weights = load_checkpoint(path), None
    return family_of(model), (model, tokenizer, processor), weights


register_family(DecoderOnlyFamily())
register_family(EncoderDecoderFamily())
register_family(RetrievalFamily())
