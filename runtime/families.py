"""The runtime side of a model family: how a bundle of that family generates text.

A family (``manifest.family``, see :class:`runtime.contract.Family`) registers the step model that runs its
LLM graphs (:class:`runtime.generation.StepModel`: prefill once, then one position per step) and the
prompt-length rule its graphs impose. :class:`runtime.pipeline.Blip2Runtime` and parity read this
registry; the export side has its own (``blip2_export.families``), keyed by the same family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.backends import GraphRunner
from runtime.contract import Family, GraphName
from runtime.decoder_only import DecoderOnlyModel
from runtime.encoder_decoder import EncoderDecoderModel
from runtime.errors import Blip2Error, LimitError
from runtime.generation import StepModel
from runtime.manifest import Manifest
from runtime.registry import Registry


class TextRuntime(Protocol):
    """What a step model needs from an opened bundle."""

    manifest: Manifest
    dec_embed: np.ndarray | None

    def graph(self, name: GraphName) -> GraphRunner: ...

    def embed_table(self) -> np.ndarray: ...


StepModelFactory = Callable[[TextRuntime, np.ndarray, list[list[int]], int | None], StepModel]


PromptCheck = Callable[[Manifest, list[int], int], None]  # (manifest, prompt ids, max_new_tokens); raises


@dataclass(frozen=True)
class RuntimeFamily:
    family: Family
    step_model: StepModelFactory | None  # None: the family ranks, it does not generate (retrieval)
    check_prompt: PromptCheck | None = None  # does a prompt (+ what is generated) fit the graphs' ranges?


RUNTIME_FAMILIES: Registry[Family, RuntimeFamily] = Registry(
    "bundle family", lambda spec: spec.family, hint="this runtime runs the families listed; upgrade blip2-export")


def register_runtime_family(spec: RuntimeFamily) -> RuntimeFamily:
    return RUNTIME_FAMILIES.register(spec)


def runtime_family(family: Family) -> RuntimeFamily:
    return RUNTIME_FAMILIES.find(family)


def step_model(rt: TextRuntime, prefix: np.ndarray, prompt_ids: list[list[int]],
               max_new_tokens: int | None = None) -> StepModel:
    """The step model of ``rt``'s family for one batch of (visual prefix, prompt ids)."""
    spec = runtime_family(rt.manifest.family)
    if spec.step_model is None:
        raise Blip2Error(f"a {spec.family.value} bundle does not generate text; use its retrieval API")
    return spec.step_model(rt, prefix, prompt_ids, max_new_tokens)


def _fits_decoder_only(manifest: Manifest, ids: list[int], max_new_tokens: int) -> None:
    m = manifest.model
    need = m.num_query_tokens + len(ids) + max_new_tokens
    if need > m.max_context:
        raise LimitError(
            f"prompt of {len(ids)} tokens + {m.num_query_tokens} visual tokens + max_new_tokens "
            f"{max_new_tokens} = {need} exceeds the bundle's context of {m.max_context} positions",
            hint="shorten the prompt, lower --max-new-tokens, or re-export with a larger --max-context",
        )


def _fits_encoder_decoder(manifest: Manifest, ids: list[int], max_new_tokens: int) -> None:
    q = manifest.model.num_query_tokens
    manifest.dims["enc_seq"].check("visual tokens + prompt tokens", q + len(ids), "--max-context")
    manifest.dims["total"].check("decoder positions (1 + max_new_tokens)", 1 + max_new_tokens, "--max-context")


def _decoder_only(rt: TextRuntime, prefix, prompt_ids, max_new_tokens) -> StepModel:
    return DecoderOnlyModel(rt.manifest, rt.graph(GraphName.DECODER), rt.embed_table(), prefix, prompt_ids,
                            max_new_tokens=max_new_tokens)


def _encoder_decoder(rt: TextRuntime, prefix, prompt_ids, max_new_tokens) -> StepModel:
    embed = rt.embed_table()
    return EncoderDecoderModel(rt.manifest, rt.graph(GraphName.ENCODER), rt.graph(GraphName.CROSS_KV),
                               rt.graph(GraphName.SEQ2SEQ_DECODER), embed,
                               embed if rt.dec_embed is None else rt.dec_embed, prefix, prompt_ids)


register_runtime_family(RuntimeFamily(Family.DECODER_ONLY, _decoder_only, _fits_decoder_only))
register_runtime_family(RuntimeFamily(Family.ENCODER_DECODER, _encoder_decoder, _fits_encoder_decoder))
register_runtime_family(RuntimeFamily(Family.RETRIEVAL, None))
