"""Decoder-only LLMs (OPT and other causal LMs): prefill once, then one position per step.

Sequences of a batch are left-padded so every row's newest token sits in the last column:
``[pad ... pad, visual prefix, prompt ids]``. Padded positions are masked out and the position ids
count only real tokens, so each row computes what it would compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.contract import GraphName, past_name
from runtime.manifest import Manifest


@dataclass
class DecoderState:
    past: dict[str, np.ndarray]  # past.{i}.{key,value} -> [rows, heads, total, head_dim]
    mask: np.ndarray  # [rows, total] int64
    next_pos: np.ndarray  # [rows] int64: position id of the next token


class DecoderOnlyModel:
    """:class:`runtime.generation.StepModel` for one batch of (visual prefix, prompt ids)."""

    def __init__(self, manifest: Manifest, decoder, embed: np.ndarray, prefix: np.ndarray,
                 prompt_ids: list[list[int]]):
        self.m = manifest.model
        self.decoder = decoder
        self.embed = embed
        self.prefix = prefix
        self.prompt_ids = prompt_ids
        self.batch = len(prompt_ids)
        self.dtype = np.dtype(decoder.record.io.inputs[0].dtype)
        self.layers = self.m.llm_layers

    def context_ids(self) -> list[list[int]]:
        image = [self.m.image_token_id] * self.m.num_query_tokens
        return [image + list(ids) for ids in self.prompt_ids]

    def _embed(self, ids) -> np.ndarray:
        return np.asarray(self.embed[np.asarray(ids, dtype=np.int64)], dtype=self.dtype)

    def prefill(self):
        B, Q, D = self.prefix.shape
        lengths = [Q + len(ids) for ids in self.prompt_ids]
        T = max(lengths)
        embeds = np.zeros((B, T, D), dtype=self.dtype)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(self.prompt_ids):
            start = T - lengths[b]
            embeds[b, start:start + Q] = self.prefix[b]
            if ids:
                embeds[b, start + Q:] = self._embed(ids)
            mask[b, start:] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        heads, hd = self.m.llm_heads, self.m.head_dim
        empty = np.zeros((B, heads, 0, hd), dtype=self.dtype)
        past = {past_name(i, k): empty for i in range(self.layers) for k in ("key", "value")}
        logits, present = self._run(embeds, mask, positions, past)
        state = DecoderState(present, mask, positions[:, -1] + 1)
        return logits[:, -1, :], state

    def step(self, tokens: np.ndarray, state: DecoderState):
        rows = len(tokens)
        embeds = self._embed(tokens).reshape(rows, 1, -1)
        mask = np.concatenate([state.mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        logits, present = self._run(embeds, mask, state.next_pos[:, None], state.past)
        return logits[:, -1, :], DecoderState(present, mask, state.next_pos + 1)

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        return DecoderState({k: v[rows] for k, v in state.past.items()}, state.mask[rows], state.next_pos[rows])

    def _run(self, embeds, mask, positions, past):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **past}
        out = self.decoder.run(feeds)
        present = {past_name(i, k): out[past_name(i, k, "present")]
                   for i in range(self.layers) for k in ("key", "value")}
        return out["logits"], present


GRAPHS = (GraphName.DECODER,)
