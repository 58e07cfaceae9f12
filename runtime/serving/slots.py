"""KV-cache slots for continuous batching of a decoder-only LLM.

The cache of every layer is one buffer ``[slots, heads, capacity, head_dim]`` allocated once. The rows in
use are packed at ``[0, rows)`` and row ``b`` holds its ``lengths[b]`` positions at ``[0, lengths[b])``
(rows aligned at position 0, as the in-place engine wants them). So the running batch is always the
contiguous view ``buffer[:rows]``:

* :meth:`SlotCache.admit` prefills newcomers (right-padded to their longest prompt) into the rows after
  the running ones and returns each newcomer's next-token logits;
* :meth:`SlotCache.step` feeds one token per running row and returns the next logits;
* :meth:`SlotCache.retire` frees a row by moving the last row into it (one row copy), so the batch
  stays packed.

Each row computes what it would compute alone: its attention mask covers its own positions only and its
position ids count its own tokens. Two ways to run the decoder, as in :mod:`runtime.decoder_only`:

* ``shared_buffer`` (the ORT engine build exported by default): the views ``buffer[:rows]`` are bound as
  both ``past.*`` and ``present.*``; the fused attention writes the new position of each row in place at
  ``lengths[b]`` (it reads the row's length from the mask).
* ``concat`` (the portable graph, any backend): ``past.*`` are the first ``max(lengths)`` positions of
  the running rows; the graph appends the new position as its last column (the mask marks each row's own
  positions plus that column), and the new column is written back at ``lengths[b]``.
"""

from __future__ import annotations

import numpy as np

from runtime.backends import KV_SHARED, GraphRunner
from runtime.contract import past_name
from runtime.errors import LimitError
from runtime.manifest import Manifest


class SlotCache:
    """``slots`` rows of ``capacity`` positions each, for the decoder runner ``decoder`` (loaded once)."""

    def __init__(self, manifest: Manifest, decoder: GraphRunner, embed: np.ndarray, *, slots: int, capacity: int):
        m = manifest.model
        self.m = m
        self.decoder = decoder
        self.embed = np.asarray(embed)
        self.slots = slots
        self.capacity = capacity
        self.dtype = np.dtype(decoder.record.io.inputs[0].dtype)
        self.kv_dtype = np.dtype(decoder.facts.kv_dtype or self.dtype)  # an int8 engine keeps an int8 cache
        self.logits_dtype = np.dtype(next(t.dtype for t in decoder.record.io.outputs if t.name == "logits"))
        self.shared = decoder.facts.kv_cache == KV_SHARED
        self._names = [(past_name(i, k), past_name(i, k, "present")) for i in range(m.llm_layers)
                       for k in ("key", "value")]
        shape = (slots, m.llm_heads, capacity, m.head_dim)
        self.buffers = {p: np.zeros(shape, dtype=self.kv_dtype) for p, _ in self._names}
        self.lengths = np.zeros(slots, dtype=np.int64)  # positions each row holds
        self.rows = 0
        self._step_binding = None  # (rows, binding, logits buffer) of the last step, reused while rows is unchanged

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def free(self) -> int:
        return self.slots - self.rows

    def _embed(self, ids) -> np.ndarray:
        return self.embed[np.asarray(ids, dtype=np.int64)].astype(self.dtype, copy=False)

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, prefix: np.ndarray, prompt_ids: list[list[int]]) -> np.ndarray:
        """Prefill ``len(prompt_ids)`` newcomers (visual prefix [k,Q,D] + prompt ids) into free rows.

        Returns their next-token logits [k, vocab]; the newcomers are rows ``[rows - k, rows)`` after it.
        """
        k = len(prompt_ids)
        if k > self.free:
            raise LimitError(f"{k} newcomers for {self.free} free KV slots")
        Q = prefix.shape[1]
        lengths = np.array([Q + len(ids) for ids in prompt_ids], dtype=np.int64)
        T = int(lengths.max())
        if T > self.capacity:
            raise LimitError(f"a prompt of {T} positions does not fit a KV slot of {self.capacity}")
        embeds = np.zeros((k, T, prefix.shape[2]), dtype=self.dtype)
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
        for b, ids in enumerate(prompt_ids):
            embeds[b, :Q] = prefix[b]
            if ids:
                embeds[b, Q:lengths[b]] = self._embed(ids)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        lo, hi = self.rows, self.rows + k
        if self.shared:
            binding = self.decoder.binding()
            binding.output("logits")
            for p, o in self._names:
                view = self.buffers[p][lo:hi]
                binding.input(p, view)
                binding.output(o, view)
            binding.input("inputs_embeds", embeds)
            binding.input("attention_mask", mask)
            binding.input("position_ids", positions)
            logits = binding.run()["logits"]
        else:
            empty = np.zeros((k, self.m.llm_heads, 0, self.m.head_dim), dtype=self.kv_dtype)
            out = self.decoder.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                    **{p: empty for p, _ in self._names}})
            for p, o in self._names:
                self.buffers[p][lo:hi, :, :T] = out[o]
            logits = out["logits"]
        self.lengths[lo:hi] = lengths
        self.rows = hi
        self._step_binding = None
        if logits.shape[1] == 1:  # the engine computed each row's newest position only
            return np.array(logits[:, 0, :])
        return np.array(logits[np.arange(k), lengths - 1, :])

    # -- decode ------------------------------------------------------------------------------------
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One token per running row -> next-token logits [rows, vocab]."""
        n = self.rows
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} running rows")
        lengths = self.lengths[:n]
        if int(lengths.max()) >= self.capacity:
            raise LimitError(f"a row reached the KV slot capacity of {self.capacity} positions")
        embeds = self._embed(tokens).reshape(n, 1, -1)
        if self.shared:
            new = lengths + 1
            mask = (np.arange(int(new.max()))[None, :] < new[:, None]).astype(np.int64)
            if self._step_binding is None or self._step_binding[0] != n:
                binding = self.decoder.binding()
                for p, o in self._names:
                    view = self.buffers[p][:n]
                    binding.input(p, view)
                    binding.output(o, view)
                out = np.empty((n, 1, self.m.vocab_size), dtype=self.logits_dtype)
                binding.output("logits", out)
                self._step_binding = (n, binding, out)
            _, binding, out = self._step_binding
            binding.input("inputs_embeds", embeds)
            binding.input("attention_mask", mask)
            binding.input("position_ids", lengths[:, None].copy())
            binding.run()
            self.lengths[:n] = new
            return out[:, -1, :].copy()
        L = int(lengths.max())
        mask = np.zeros((n, L + 1), dtype=np.int64)
        mask[:, :L] = np.arange(L)[None, :] < lengths[:, None]
        mask[:, L] = 1
        feeds = {p: self.buffers[p][:n, :, :L] for p, _ in self._names}
        out = self.decoder.run({"inputs_embeds": embeds, "attention_mask": mask,
                                "position_ids": lengths[:, None].copy(), **feeds})
        rows = np.arange(n)
        for p, o in self._names:
            self.buffers[p][rows, :, lengths] = out[o][:, :, L]
        self.lengths[:n] = lengths + 1
        return np.array(out["logits"][:, -1, :])

    def retire(self, row: int) -> int | None:
        """Free ``row``: the last running row moves into it. Returns the index it moved from (None if ``row``
        was the last)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not running (rows: {self.rows})")
        moved = None
        if row != last:
            used = int(self.lengths[last])
            for buf in self.buffers.values():
                buf[row, :, :used] = buf[last, :, :used]
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths[last] = 0
        self.rows = last
        self._step_binding = None
        return moved

    def reset(self) -> None:
        """Drop every row (after a failed run: the cache contents are not trusted)."""
        self.rows = 0
        self.lengths[:] = 0
        self._step_binding = None
