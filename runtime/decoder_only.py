"""Decoder-only LLMs (OPT and other causal LMs): prefill once, then one position per step.

Two ways to hold the KV cache, chosen by the decoder graph the backend loaded (``decoder.facts.kv_cache``,
see :class:`runtime.backends.RunnerFacts`):

* ``concat`` (the exported graph, any backend): sequences of a batch are left-padded so every row's
  newest token sits in the last column: ``[pad ... pad, visual prefix, prompt ids]``. Padded positions
  are masked out and the position ids count only real tokens, so each row computes what it would
  compute alone. ``past.*`` go in, ``present.*`` (past + new) come out each step.
* ``shared_buffer`` (an ORT engine build, see ``engines.ort_optimize``): the cache of every layer is
  one buffer ``[rows, heads, capacity, head_dim]`` allocated once per request (capacity = context +
  ``max_new_tokens`` when known) and bound as both ``past.*`` and ``present.*``; the fused attention
  writes each new position in place. Rows are aligned at position 0 (row ``b`` holds ``len_b``
  positions) and the attention mask marks ``[0, len_b)``. A step therefore copies nothing: its logits
  land in a buffer bound once per binding, and the loop allocates only a few small arrays per token.
  The buffers have the engine's cache type (``decoder.facts.kv_dtype``: int8 for an int8 build's engine).

Both give the same logits; a state is consumed by ``step`` (its cache may be extended in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends import KV_SHARED, GraphRunner
from runtime.contract import GraphName, past_name
from runtime.manifest import Manifest

_CAPACITY_STEP = 64  # growth granule of a shared cache whose final length is not known


@dataclass
class DecoderState:
    past: dict[str, np.ndarray]  # past.{i}.{key,value} -> [rows, heads, total | capacity, head_dim]
    mask: np.ndarray  # [rows, total] int64 (shared_buffer: ones at [0, len_b))
    next_pos: np.ndarray  # [rows] int64: position id of the next token (shared_buffer: also len_b)
    binding: Any = None  # shared_buffer: the backend's IO binding with the cache buffers bound
    logits: np.ndarray | None = None  # shared_buffer: [rows, 1, vocab] bound as the steps' logits output


class DecoderOnlyModel:
    """:class:`runtime.generation.StepModel` for one batch of (visual prefix, prompt ids).

    ``max_new_tokens`` (optional) sizes an in-place cache once for the whole generation.
    """

    def __init__(self, manifest: Manifest, decoder: GraphRunner, embed: np.ndarray, prefix: np.ndarray,
                 prompt_ids: list[list[int]], max_new_tokens: int | None = None):
        self.m = manifest.model
        self.decoder = decoder
        self.embed = np.asarray(embed)  # a memory-mapped table, viewed as a plain array (cheaper to index)
        self.prefix = prefix
        self.prompt_ids = prompt_ids
        self.batch = len(prompt_ids)
        self.dtype = np.dtype(decoder.record.io.inputs[0].dtype)
        self.kv_dtype = np.dtype(decoder.facts.kv_dtype or self.dtype)  # an ORT engine may keep int8
        self.logits_dtype = np.dtype(next(t.dtype for t in decoder.record.io.outputs if t.name == "logits"))
        self.layers = self.m.llm_layers
        self.max_new_tokens = max_new_tokens
        self.shared = decoder.facts.kv_cache == KV_SHARED
        self._names = [(past_name(i, k), past_name(i, k, "present")) for i in range(self.layers)
                       for k in ("key", "value")]

    def context_ids(self) -> list[list[int]]:
        image = [self.m.image_token_id] * self.m.num_query_tokens
        return [image + list(ids) for ids in self.prompt_ids]

    def _embed(self, ids) -> np.ndarray:
        return self.embed[np.asarray(ids, dtype=np.int64)].astype(self.dtype, copy=False)

    def _rows(self, left: bool):
        """Embeddings [B,T,D], mask and positions of the prompt rows, padded on the left or the right."""
        B, Q, D = self.prefix.shape
        lengths = np.array([Q + len(ids) for ids in self.prompt_ids], dtype=np.int64)
        T = int(lengths.max())
        embeds = np.zeros((B, T, D), dtype=self.dtype)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(self.prompt_ids):
            start = T - int(lengths[b]) if left else 0
            embeds[b, start:start + Q] = self.prefix[b]
            if ids:
                embeds[b, start + Q:start + int(lengths[b])] = self._embed(ids)
            mask[b, start:start + int(lengths[b])] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        return embeds, mask, positions, lengths

    def prefill(self):
        if self.shared:
            return self._prefill_shared()
        embeds, mask, positions, _ = self._rows(left=True)
        B = embeds.shape[0]
        empty = np.zeros((B, self.m.llm_heads, 0, self.m.head_dim), dtype=self.dtype)
        past = {p: empty for p, _ in self._names}
        logits, present = self._run(embeds, mask, positions, past)
        state = DecoderState(present, mask, positions[:, -1] + 1)
        return logits[:, -1, :], state

    def step(self, tokens: np.ndarray, state: DecoderState):
        rows = len(tokens)
        embeds = self._embed(tokens).reshape(rows, 1, -1)
        if self.shared:
            return self._step_shared(embeds, state)
        mask = np.concatenate([state.mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        logits, present = self._run(embeds, mask, state.next_pos[:, None], state.past)
        return logits[:, -1, :], DecoderState(present, mask, state.next_pos + 1)

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        if self.shared:
            used = int(state.next_pos.max())
            past = {}
            for name, buf in state.past.items():
                new = np.empty((len(rows),) + buf.shape[1:], dtype=buf.dtype)
                np.take(buf[:, :, :used], rows, axis=0, out=new[:, :, :used], mode="clip")
                past[name] = new
            return DecoderState(past, state.mask[rows], state.next_pos[rows], self._bind(past))
        return DecoderState({k: v[rows] for k, v in state.past.items()}, state.mask[rows], state.next_pos[rows])

    def _run(self, embeds, mask, positions, past):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **past}
        out = self.decoder.run(feeds)
        present = {p: out[o] for p, o in self._names}
        return out["logits"], present

    # -- in-place cache (ORT engine build) ---------------------------------------------------------
    def _bind(self, past: dict[str, np.ndarray]):
        binding = self.decoder.binding()
        binding.output("logits")
        for p, o in self._names:
            binding.input(p, past[p])
            binding.output(o, past[p])
        return binding

    def _capacity(self, need: int) -> int:
        if self.max_new_tokens is not None:
            return need + self.max_new_tokens
        return -(-(need + _CAPACITY_STEP) // _CAPACITY_STEP) * _CAPACITY_STEP

    def _prefill_shared(self):
        embeds, mask, positions, lengths = self._rows(left=False)
        B, T = mask.shape
        shape = (B, self.m.llm_heads, self._capacity(T), self.m.head_dim)
        past = {p: np.zeros(shape, dtype=self.kv_dtype) for p, _ in self._names}
        binding = self._bind(past)
        logits = self._run_bound(binding, embeds, mask, positions)
        if logits.shape[1] == 1:  # the engine computed each row's newest position only
            return logits[:, 0, :], DecoderState(past, mask, lengths, binding)
        return logits[np.arange(B), lengths - 1, :], DecoderState(past, mask, lengths, binding)

    def _step_shared(self, embeds: np.ndarray, state: DecoderState):
        lengths = state.next_pos + 1
        total = int(lengths.max())
        past, binding = state.past, state.binding
        capacity = next(iter(past.values())).shape[2]
        if total > capacity:  # grow (only when max_new_tokens was not given, or a caller steps past it)
            used = total - 1
            bigger = {}
            for name, buf in past.items():
                new = np.zeros(buf.shape[:2] + (max(2 * capacity, self._capacity(total)),) + buf.shape[3:], buf.dtype)
                new[:, :, :used] = buf[:, :, :used]
                bigger[name] = new
            past, binding = bigger, self._bind(bigger)
        mask = (np.arange(total)[None, :] < lengths[:, None]).astype(np.int64)
        out = state.logits if binding is state.binding else None
        if out is None:  # bind the steps' logits once per binding: no per-step output allocation or fetch
            out = np.empty((len(lengths), 1, self.m.vocab_size), dtype=self.logits_dtype)
            binding.output("logits", out)
        binding.input("inputs_embeds", embeds)
        binding.input("attention_mask", mask)
        binding.input("position_ids", state.next_pos[:, None])
        binding.run()
        return out[:, -1, :].copy(), DecoderState(past, mask, lengths, binding, out)  # callers may keep logits

    @staticmethod
    def _run_bound(binding, embeds, mask, positions) -> np.ndarray:
        binding.input("inputs_embeds", embeds)
        binding.input("attention_mask", mask)
        binding.input("position_ids", positions)
        return binding.run()["logits"]


GRAPHS = (GraphName.DECODER,)
