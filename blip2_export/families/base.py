"""What a model family tells the exporter and parity: one :class:`FamilyAdapter` per family.

An adapter reads the model's facts the way transformers reads them, plans the graphs (wrapper module +
IO from :mod:`runtime.contract`), says the symbolic dims' ranges and the sizes to trace at, writes the
text side (embedding tables, tokenizer), attaches engines made at export, and gives parity its eager
reference. :func:`blip2_export.export.export_bundle` is the one export loop that runs them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.contract import Family, GraphIO, GraphName
from runtime.manifest import DimRange, GenerationDefaults, GraphRecord, ModelFacts


@dataclass(frozen=True)
class GraphPlan:
    """One graph to export: its name, the torch module that computes it, and its declared IO."""

    name: GraphName
    module: Any  # torch.nn.Module
    io: GraphIO


class FamilyAdapter:
    """Base of the family adapters; subclasses set :attr:`family` and :attr:`trace_sizes` and implement
    :meth:`matches`, :meth:`facts`, :meth:`dims` and :meth:`plan` (the rest has working defaults)."""

    family: ClassVar[Family]
    trace_sizes: ClassVar[dict[str, int]]  # example sizes per symbolic dim: all different, none baked in

    # -- which checkpoints ------------------------------------------------------------------------
    def claims_checkpoint(self, path: Path) -> bool:
        """Whether this family must load ``path`` itself (by its config's architecture), before any
        generic load. Default: no (the generic BLIP-2 load, then :meth:`matches` on the model)."""
        return False

    def load(self, path: Path, lazy: bool = True):
        """``(model, tokenizer, image_processor, weights)`` of a checkpoint this family claimed (``weights``:
        see :func:`blip2_export.families.load_for_export`; None when the model holds its own)."""
        raise NotImplementedError

    def matches(self, model) -> bool:
        raise NotImplementedError

    # -- export -----------------------------------------------------------------------------------
    def facts(self, model, tokenizer) -> ModelFacts:
        raise NotImplementedError

    def visual_tokens(self, facts: ModelFacts) -> int:
        """Positions of the context the visual prefix takes (``--max-context`` must leave room after them)."""
        return facts.num_query_tokens

    def check(self, facts: ModelFacts) -> None:
        """Refuse facts this family cannot export (raise :class:`runtime.errors.Blip2Error`)."""

    def limit_context(self, facts: ModelFacts, max_context: int | None) -> ModelFacts:
        return dataclasses.replace(facts, max_context=min(max_context or facts.max_context, facts.max_context))

    def dims(self, facts: ModelFacts, max_batch: int) -> dict[str, DimRange]:
        raise NotImplementedError

    def plan(self, model, facts: ModelFacts) -> list[GraphPlan]:
        raise NotImplementedError

    def attach_engines(self, tmp: Path, graphs: dict[str, GraphRecord], facts: ModelFacts, config,
                       warn) -> dict[str, GraphRecord]:
        """Engines made once at export (``config.ort_engine``), added to the graph records. Default: none."""
        return graphs

    def write_text(self, tmp: Path, model, tokenizer, weights=None) -> dict:
        """The text side's files (embedding tables, tokenizer), returned as manifest file records;
        ``weights`` as for :func:`blip2_export.bundle_writer.export_graph`."""
        raise NotImplementedError

    def generation(self, config) -> GenerationDefaults:
        return GenerationDefaults(max_new_tokens=config.max_new_tokens)

    # -- parity (the eager reference) --------------------------------------------------------------
    def eager_special_ids(self, facts: ModelFacts) -> dict:
        """Special ids to give eager ``generate`` (the ones the exporter resolved, so both sides agree)."""
        return {"eos_token_id": list(facts.eos_token_ids), "pad_token_id": facts.pad_token_id}

    def eager_new_tokens(self, output_ids: list[int], input_len: int) -> list[int]:
        """The generated tokens of one eager ``generate`` output row."""
        raise NotImplementedError

    def eager_forced_logits(self, model, prefix_ref, text_ids: list[int], ref: list[int],
                            facts: ModelFacts) -> np.ndarray:
        """Eager logits [steps, vocab] at each generated position when fed the eager tokens ``ref``."""
        raise NotImplementedError
