"""One generation loop for every backend and LLM family.

A :class:`StepModel` hides the family: ``prefill`` runs the whole prompt once and returns the
last-position logits plus a cache state; ``step`` feeds one new token per sequence against that
cache. Greedy, sampling and beam search are written once on top, in numpy, following the
semantics of transformers' ``generate`` so results match it token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from runtime.deadline import check as check_deadline
from runtime.errors import Blip2Error

NEG_INF = -1.0e9


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    length_penalty: float = 1.0  # beam search: score / generated_length ** length_penalty
    early_stopping: bool = False  # beam search: stop a sequence once num_beams hypotheses finished
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise Blip2Error(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise Blip2Error("min_new_tokens must be between 0 and max_new_tokens")
        if self.num_beams < 1:
            raise Blip2Error(f"num_beams must be >= 1 (got {self.num_beams})")
        if self.num_beams > 1 and self.do_sample:
            raise Blip2Error("beam search with sampling is not supported; use num_beams=1 with do_sample")
        if self.temperature <= 0:
            raise Blip2Error(f"temperature must be > 0 (got {self.temperature})")
        if self.top_k < 0:
            raise Blip2Error(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise Blip2Error(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise Blip2Error(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        return self

    def with_(self, **kw) -> GenerationConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass
class Sequence_:
    token_ids: list[int]
    finished: bool  # ended on a stop token (else: max_new_tokens reached)
    score: float | None = None


class StepModel(Protocol):
    """What a model family provides to the loop. ``state`` is opaque to the loop."""

    batch: int

    def prefill(self) -> tuple[np.ndarray, Any]: ...  # logits [batch, vocab], state

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...  # tokens [rows]

    def select(self, state: Any, rows: np.ndarray) -> Any: ...  # gather cache rows (beam expand/reorder)

    def context_ids(self) -> list[list[int]]: ...  # ids transformers would see as input_ids (rep. penalty)


StreamCallback = Callable[[int, list[int | None]], None]


@dataclass
class LogitsProcessors:
    """Processors, warpers and the token choice of one generation (its own rng: same seed, same draws)."""

    cfg: GenerationConfig
    stop: np.ndarray
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def logits(self, logits: np.ndarray, history: list[list[int]], generated: int) -> np.ndarray:
        """Processors applied before the choice, in transformers' order."""
        x = logits.astype(np.float32, copy=True)
        if self.cfg.repetition_penalty != 1.0:
            p = self.cfg.repetition_penalty
            for row, seen in enumerate(history):
                idx = np.unique(np.asarray(seen, dtype=np.int64))
                idx = idx[(idx >= 0) & (idx < x.shape[1])]
                vals = x[row, idx]
                x[row, idx] = np.where(vals < 0, vals * p, vals / p)
        if generated < self.cfg.min_new_tokens and self.stop.size:
            x[:, self.stop] = -np.inf
        return x

    def warp(self, x: np.ndarray) -> np.ndarray:
        """Sampling warpers: temperature, top-k, top-p (transformers' order)."""
        cfg = self.cfg
        if cfg.temperature != 1.0:
            x = x / np.float32(cfg.temperature)
        if cfg.top_k and cfg.top_k < x.shape[1]:
            kth = np.partition(x, -cfg.top_k, axis=1)[:, -cfg.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        if cfg.top_p < 1.0:
            order = np.argsort(x, axis=1)  # ascending, as transformers' TopPLogitsWarper
            sorted_x = np.take_along_axis(x, order, axis=1)
            probs = _softmax(sorted_x)
            cum = np.cumsum(probs, axis=1)
            remove = cum <= (1 - cfg.top_p)
            remove[:, -1] = False  # keep at least one token
            mask = np.zeros_like(remove)
            np.put_along_axis(mask, order, remove, axis=1)
            x = np.where(mask, -np.inf, x)
        return x

    def choose(self, logits: np.ndarray, history: list[list[int]], generated: int) -> np.ndarray:
        """The next token of each row of ``logits`` [rows, vocab] (greedy or sampled)."""
        scores = self.logits(logits, history, generated)
        return self.sample(scores) if self.cfg.do_sample else np.argmax(scores, axis=1).astype(np.int64)

    def sample(self, x: np.ndarray) -> np.ndarray:
        probs = _softmax(self.warp(x).astype(np.float64))
        u = self.rng.random((x.shape[0], 1))
        cdf = np.cumsum(probs, axis=1)
        cdf /= cdf[:, -1:]
        return np.minimum((cdf < u).sum(axis=1), x.shape[1] - 1).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def generate(model: StepModel, cfg: GenerationConfig, *, eos_token_ids: Sequence[int], pad_token_id: int,
             stream: StreamCallback | None = None) -> list[Sequence_]:
    procs = processors(cfg, eos_token_ids)
    if cfg.num_beams > 1:
        return _beam_search(model, cfg, procs, pad_token_id)
    return _greedy_or_sample(model, cfg, procs, pad_token_id, stream)


def processors(cfg: GenerationConfig, eos_token_ids: Sequence[int]) -> LogitsProcessors:
    """The processors of one generation: ``cfg``'s stop ids (else the model's EOS ids), its seeded rng."""
    cfg.validate()
    stop = np.asarray(cfg.stop_token_ids if cfg.stop_token_ids is not None else tuple(eos_token_ids), np.int64)
    return LogitsProcessors(cfg, stop, np.random.default_rng(cfg.seed))


def _greedy_or_sample(model: StepModel, cfg: GenerationConfig, procs: LogitsProcessors, pad: int,
                      stream: StreamCallback | None) -> list[Sequence_]:
    logits, state = model.prefill()
    history = [list(c) for c in model.context_ids()]
    out: list[list[int]] = [[] for _ in range(model.batch)]
    finished = np.zeros(model.batch, dtype=bool)
    for step in range(cfg.max_new_tokens):
        check_deadline()  # a graph that never emits a stop token cannot hold the caller past the deadline
        nxt = procs.choose(logits, history, step)
        nxt = np.where(finished, pad, nxt)
        for row in np.flatnonzero(~finished):
            out[row].append(int(nxt[row]))
            history[row].append(int(nxt[row]))
        if stream is not None:
            stream(step, [None if finished[r] else int(nxt[r]) for r in range(model.batch)])
        finished |= np.isin(nxt, procs.stop)
        if finished.all() or step == cfg.max_new_tokens - 1:
            break
        logits, state = model.step(nxt, state)
    return [Sequence_(ids, bool(ids and ids[-1] in procs.stop)) for ids in out]


def _beam_search(model: StepModel, cfg: GenerationConfig, procs: LogitsProcessors, pad: int) -> list[Sequence_]:
    """Vectorised beam search with transformers' semantics (top 2*beams candidates, finished-hypothesis
    pool ranked by score / length**length_penalty, its early-stop heuristic)."""
    B, K, T = model.batch, cfg.num_beams, cfg.max_new_tokens
    lp = cfg.length_penalty
    keep = max(2, 1 + len(procs.stop)) * K
    logits, state = model.prefill()
    rows = np.repeat(np.arange(B), K)
    state = model.select(state, rows)
    logits = logits[rows]
    context = [list(c) for c in model.context_ids()]

    running = np.full((B, K, T), pad, dtype=np.int64)
    running_scores = np.zeros((B, K), dtype=np.float32)
    running_scores[:, 1:] = NEG_INF
    seqs = np.full((B, K, T), pad, dtype=np.int64)
    seq_len = np.zeros((B, K), dtype=np.int64)
    beam_scores = np.full((B, K), NEG_INF, dtype=np.float32)
    done = np.zeros((B, K), dtype=bool)
    unsatisfied = np.ones(B, dtype=bool)
    top_mask = np.arange(keep) < K
    batch_idx = np.arange(B)[:, None]

    for g in range(T):
        check_deadline()
        history = [context[r // K] + running[r // K, r % K, :g].tolist() for r in range(B * K)]
        logp = procs.logits(_log_softmax(logits), history, g)
        V = logp.shape[1]
        acc = (logp.reshape(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
        top = np.argsort(-acc, axis=1, kind="stable")[:, :keep]
        top_scores = np.take_along_axis(acc, top, axis=1)
        src_beam, tok = top // V, top % V
        cand = running[batch_idx, src_beam].copy()
        cand[:, :, g] = tok
        hits = np.isin(tok, procs.stop) | (g + 1 >= T)

        # beams that continue
        run_scores = top_scores + hits.astype(np.float32) * NEG_INF
        nxt = np.argsort(-run_scores, axis=1, kind="stable")[:, :K]
        running = np.take_along_axis(cand, nxt[:, :, None], axis=1)
        running_scores = np.take_along_axis(run_scores, nxt, axis=1)
        parent = np.take_along_axis(src_beam, nxt, axis=1)

        # finished hypotheses pool
        just_done = hits & top_mask[None, :]
        fin = top_scores / np.float32((g + 1) ** lp)
        if cfg.early_stopping:
            fin = fin + (done.all(axis=1, keepdims=True)).astype(np.float32) * NEG_INF
        fin = fin + (~unsatisfied[:, None]).astype(np.float32) * NEG_INF
        fin = fin + (~just_done).astype(np.float32) * NEG_INF
        m_seqs = np.concatenate([seqs, cand], axis=1)
        m_scores = np.concatenate([beam_scores, fin], axis=1)
        m_len = np.concatenate([seq_len, np.full((B, keep), g + 1)], axis=1)
        m_done = np.concatenate([done, just_done], axis=1)
        best = np.argsort(-m_scores, axis=1, kind="stable")[:, :K]
        seqs = np.take_along_axis(m_seqs, best[:, :, None], axis=1)
        beam_scores = np.take_along_axis(m_scores, best, axis=1)
        seq_len = np.take_along_axis(m_len, best, axis=1)
        done = np.take_along_axis(m_done, best, axis=1)

        # transformers' early-stop heuristic (early_stopping=False: best running vs worst finished)
        best_running = running_scores[:, :1] / np.float32((g + 1) ** lp)
        worst = np.where(done, beam_scores.min(axis=1, keepdims=True), NEG_INF)
        unsatisfied = unsatisfied & np.any(best_running > worst, axis=1)
        if not (unsatisfied.any() and not (cfg.early_stopping and done.all()) and not hits.all()):
            break
        flat_parent = (np.arange(B)[:, None] * K + parent).reshape(-1)
        state = model.select(state, flat_parent)
        logits, state = model.step(running[:, :, g].reshape(-1), state)

    result = []
    for b in range(B):
        n = int(seq_len[b, 0])
        ids = seqs[b, 0, :n].tolist()
        result.append(Sequence_(ids, bool(ids and ids[-1] in procs.stop), float(beam_scores[b, 0])))
    return result
