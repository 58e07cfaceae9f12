"""Spine acceptance 2: after one prefill, each step feeds the decoder exactly one new position."""

from __future__ import annotations

from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime


class Recorder:
    def __init__(self, inner):
        self.inner = inner
        self.record = inner.record
        self.calls = 0
        self.seen: list[tuple[int, int, int]] = []  # (rows, new positions, past length)

    def run(self, feeds):
        self.calls += 1
        self.seen.append((feeds["inputs_embeds"].shape[0], feeds["inputs_embeds"].shape[1],
                          feeds["past.0.key"].shape[2]))
        return self.inner.run(feeds)


def _runtime_with_recorder(bundle):
    rt = Blip2Runtime(bundle)
    rec = Recorder(rt.graph(GraphName.DECODER))
    rt._graphs[GraphName.DECODER.value] = rec
    return rt, rec


def test_one_position_per_step_after_prefill(tiny_bundle):
    rt, rec = _runtime_with_recorder(tiny_bundle)
    out = rt.generate([_img()], ["a photo of"], max_new_tokens=10)[0]
    nq = rt.manifest.model.num_query_tokens
    prompt_len = nq + len(rt.tokenizer.encode("a photo of"))
    rows, first_len, first_past = rec.seen[0]
    assert (first_len, first_past) == (prompt_len, 0)  # prefill: the whole prompt, empty cache
    steps = rec.seen[1:]
    assert len(steps) == len(out.token_ids) - 1
    for k, (_, new, past) in enumerate(steps):
        assert new == 1
        assert past == prompt_len + k  # the cache grows by one position per step


def test_beam_search_steps_feed_one_position_per_beam(tiny_bundle):
    rt, rec = _runtime_with_recorder(tiny_bundle)
    rt.generate([_img(), _img(1)], ["", "a photo of"], num_beams=3, max_new_tokens=6)
    assert rec.seen[0][0] == 2  # prefill once per input, not per beam
    assert all(rows == 6 and new == 1 for rows, new, _ in rec.seen[1:])


def _img(seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
