"""Spine acceptance 2: after one prefill, each step feeds the decoder exactly one new position."""

from __future__ import annotations

from engines.ort_optimize import KV_SHARED
from runtime.backends.ort import OrtBinding
from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime


class Recorder:
    """Records each decoder run on the path the runtime takes by default: the ORT engine's IO binding with
    the KV cache bound in place (``OrtBinding.run``). A run through the copying path (``OrtGraph.run``)
    is counted too: the tests require none."""

    def __init__(self, monkeypatch, decoder):
        self.seen: list[tuple[int, int, int]] = []  # (rows, new positions, past length)
        self.copying_runs = 0
        self.cache_buffers: set[int] = set()
        real_bound, real_plain = OrtBinding.run, type(decoder).run
        rec = self

        def bound(binding):
            if binding.graph is decoder:
                embeds, mask = binding._keep["inputs_embeds"], binding._keep["attention_mask"]
                new = embeds.shape[1]
                rec.seen.append((embeds.shape[0], new, int(mask.sum(axis=1).max()) - new))
                rec.cache_buffers.add(binding._keep["past.0.key"].ctypes.data)
            return real_bound(binding)

        def plain(graph, feeds):
            if graph is decoder:
                rec.copying_runs += 1
            return real_plain(graph, feeds)

        monkeypatch.setattr(OrtBinding, "run", bound)
        monkeypatch.setattr(type(decoder), "run", plain)


def _runtime_with_recorder(bundle, monkeypatch):
    rt = Blip2Runtime(bundle)
    decoder = rt.graph(GraphName.DECODER)
    assert decoder.facts.kv_cache == KV_SHARED  # the default: the ORT engine with the cache updated in place
    return rt, Recorder(monkeypatch, decoder)


def test_one_position_per_step_after_prefill(tiny_bundle, monkeypatch):
    rt, rec = _runtime_with_recorder(tiny_bundle, monkeypatch)
    out = rt.generate([_img()], ["a photo of"], max_new_tokens=10)[0]
    nq = rt.manifest.model.num_query_tokens
    prompt_len = nq + len(rt.tokenizer.encode("a photo of"))
    _, first_len, first_past = rec.seen[0]
    assert (first_len, first_past) == (prompt_len, 0)  # prefill: the whole prompt, empty cache
    steps = rec.seen[1:]
    assert len(steps) == len(out.token_ids) - 1
    for k, (_, new, past) in enumerate(steps):
        assert new == 1
        assert past == prompt_len + k  # the cache grows by one position per step
    assert rec.copying_runs == 0
    assert len(rec.cache_buffers) == 1  # one cache buffer, written in place by every step


def test_beam_search_steps_feed_one_position_per_beam(tiny_bundle, monkeypatch):
    rt, rec = _runtime_with_recorder(tiny_bundle, monkeypatch)
    rt.generate([_img(), _img(1)], ["", "a photo of"], num_beams=3, max_new_tokens=6)
    assert rec.seen[0][0] == 2  # prefill once per input, not per beam
    assert len(rec.seen) > 2 and all(rows == 6 and new == 1 for rows, new, _ in rec.seen[1:])
    assert rec.copying_runs == 0


def _img(seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
