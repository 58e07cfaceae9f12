"""Encoder-decoder LLMs (Flan-T5): encode once, compute cross-attention k/v once, then decode.

``prefill`` runs the ``encoder`` graph over ``[visual prefix ; prompt embeddings]`` (right-padded: a
row's real positions keep the relative positions they have alone, padded ones are masked), then
``cross_kv`` once, then the first decoder step from ``decoder_start``. Every ``step`` feeds one token
per row to ``seq2seq_decoder`` with the growing self-attention cache and the same cross k/v.

Beam search reorders rows only within one input, and all rows of one input share their cross k/v,
so :meth:`EncoderDecoderModel.select` copies them only when the row-to-input map really changes
(once, when beams are expanded) instead of at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends import GraphRunner
from runtime.contract import GraphName, past_name
from runtime.manifest import Manifest


@dataclass
class Seq2SeqState:
    past: dict[str, np.ndarray]  # past.{i}.{key,value} -> [rows, heads, decoded, head_dim]
    cross: dict[str, np.ndarray]  # cross.{i}.{key,value} -> [rows, heads, enc_seq, head_dim]
    enc_mask: np.ndarray  # [rows, enc_seq] int64
    source: np.ndarray  # [rows] index of the input each row belongs to


class EncoderDecoderModel:
    """:class:`runtime.generation.StepModel` for one batch of (visual prefix, prompt ids)."""

    def __init__(self, manifest: Manifest, encoder: GraphRunner, cross_kv: GraphRunner, decoder: GraphRunner,
                 embed: np.ndarray, dec_embed: np.ndarray, prefix: np.ndarray, prompt_ids: list[list[int]]):
        """``embed``: the encoder's token table; ``dec_embed``: the decoder's (the same table where tied)."""
        self.m = manifest.model
        self.dims = manifest.dims
        self.encoder, self.cross_kv, self.decoder = encoder, cross_kv, decoder
        self.embed, self.dec_embed = embed, dec_embed
        self.prefix = prefix
        self.prompt_ids = [list(ids) for ids in prompt_ids]
        self.batch = len(prompt_ids)
        self.dtype = np.dtype(self.encoder.record.io.inputs[0].dtype)
        self.layers = self.m.llm_layers
        self.start = int(self.m.decoder_start_token_id if self.m.decoder_start_token_id is not None
                          else self.m.pad_token_id)
        q = prefix.shape[1]
        for ids in self.prompt_ids:
            self.dims["enc_seq"].check("visual tokens + prompt tokens", q + len(ids), "--max-context")

    def context_ids(self) -> list[list[int]]:
        # transformers' input_ids for an encoder-decoder are the decoder ids so far: [decoder_start].
        return [[self.start] for _ in range(self.batch)]

    def _embed(self, table: np.ndarray, ids) -> np.ndarray:
        return np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=self.dtype)

    def prefill(self):
        B, Q, D = self.prefix.shape
        lengths = [Q + len(ids) for ids in self.prompt_ids]
        T = max(lengths)
        embeds = np.zeros((B, T, D), dtype=self.dtype)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(self.prompt_ids):
            embeds[b, :Q] = self.prefix[b]
            if ids:
                embeds[b, Q:lengths[b]] = self._embed(self.embed, ids)
            mask[b, :lengths[b]] = 1
        hidden = self.encoder.run({"inputs_embeds": embeds, "attention_mask": mask})["encoder_hidden_states"]
        cross = self.cross_kv.run({"encoder_hidden_states": hidden})
        heads, hd = self.m.llm_heads, self.m.head_dim
        empty = np.zeros((B, heads, 0, hd), dtype=self.dtype)
        past = {past_name(i, k): empty for i in range(self.layers) for k in ("key", "value")}
        state = Seq2SeqState(past, cross, mask, np.arange(B))
        return self._decode(np.full(B, self.start, dtype=np.int64), state)

    def step(self, tokens: np.ndarray, state: Seq2SeqState):
        return self._decode(np.asarray(tokens, dtype=np.int64), state)

    def select(self, state: Seq2SeqState, rows: np.ndarray) -> Seq2SeqState:
        rows = np.asarray(rows, dtype=np.int64)
        past = {k: v[rows] for k, v in state.past.items()}
        source = state.source[rows]
        if np.array_equal(source, state.source):
            return Seq2SeqState(past, state.cross, state.enc_mask, state.source)  # same inputs: reuse cross k/v
        return Seq2SeqState(past, {k: v[rows] for k, v in state.cross.items()}, state.enc_mask[rows], source)

    def _decode(self, tokens: np.ndarray, state: Seq2SeqState):
        rows = len(tokens)
        decoded = next(iter(state.past.values())).shape[2]
        self.dims["total"].check("decoder positions", decoded + 1, "--max-context")
        embeds = self._embed(self.dec_embed, tokens).reshape(rows, 1, -1)
        out = self.decoder.run({"decoder_inputs_embeds": embeds, "encoder_attention_mask": state.enc_mask,
                                **state.past, **state.cross})
        present = {past_name(i, k): out[past_name(i, k, "present")]
                   for i in range(self.layers) for k in ("key", "value")}
        return out["logits"][:, -1, :], Seq2SeqState(present, state.cross, state.enc_mask, state.source)


GRAPHS = (GraphName.ENCODER, GraphName.CROSS_KV, GraphName.SEQ2SEQ_DECODER)
