"""Generation options of the runtime: sampling, penalties, stop ids, streaming, batching, prefix reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.errors import Blip2Error
from runtime.generation import GenerationConfig
from runtime.pipeline import Blip2Runtime


def _imgs(n):
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=(36 + 4 * i, 40, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Blip2Runtime(tiny_bundle)


def _hf(tiny_model, image, prompt, **kw):
    model, tok, proc = tiny_model
    pv = proc([image], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[model.config.image_token_index] * model.config.num_query_tokens + tok(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_repetition_penalty_matches_transformers(rt, tiny_model):
    img = _imgs(1)[0]
    ref = _hf(tiny_model, img, "a photo of", max_new_tokens=20, repetition_penalty=1.8)
    got = rt.generate([img], ["a photo of"], max_new_tokens=20, repetition_penalty=1.8)[0].token_ids
    assert got == ref[: len(got)] and len(got) == len(ref)
    plain = rt.generate([img], ["a photo of"], max_new_tokens=20)[0].token_ids
    assert plain != got  # the penalty changed something on this model


def test_length_penalty_beam_matches_transformers(rt, tiny_model):
    img = _imgs(1)[0]
    ref = _hf(tiny_model, img, "", max_new_tokens=12, num_beams=4, length_penalty=0.5)
    got = rt.generate([img], [""], max_new_tokens=12, num_beams=4, length_penalty=0.5)[0].token_ids
    assert got == ref


def test_sampling_is_seeded(rt):
    img = _imgs(1)[0]
    a = rt.generate([img], [""], max_new_tokens=16, do_sample=True, temperature=1.5, seed=3)[0].token_ids
    b = rt.generate([img], [""], max_new_tokens=16, do_sample=True, temperature=1.5, seed=3)[0].token_ids
    c = rt.generate([img], [""], max_new_tokens=16, do_sample=True, temperature=1.5, seed=4)[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(rt):
    img = _imgs(1)[0]
    greedy = rt.generate([img], ["red"], max_new_tokens=12)[0].token_ids
    sampled = rt.generate([img], ["red"], max_new_tokens=12, do_sample=True, top_k=1, seed=0)[0].token_ids
    assert sampled == greedy


def test_top_p_keeps_only_the_nucleus(rt):
    from runtime.generation import LogitsProcessors

    procs = LogitsProcessors(GenerationConfig(do_sample=True, top_p=0.5), np.array([2]))
    logits = np.log(np.array([[0.6, 0.3, 0.1]], dtype=np.float32))
    warped = procs.warp(logits)
    assert np.isfinite(warped[0, 0]) and np.isinf(warped[0, 1]) and np.isinf(warped[0, 2])


def test_stop_token_ends_generation(rt):
    img = _imgs(1)[0]
    free = rt.generate([img], ["a photo of"], max_new_tokens=12)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = rt.generate([img], ["a photo of"], max_new_tokens=12, stop_token_ids=(stop_at,))[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finished


def test_min_new_tokens_blocks_stop_tokens(rt):
    img = _imgs(1)[0]
    free = rt.generate([img], [""], max_new_tokens=10)[0]
    stop = free.token_ids[0]
    out = rt.generate([img], [""], max_new_tokens=10, stop_token_ids=(stop,), min_new_tokens=5)[0]
    assert stop not in out.token_ids[:5]
    assert len(out.token_ids) >= 5


def test_streaming_callback_sees_every_token(rt):
    imgs = _imgs(2)
    seen: list[list] = []
    res = rt.generate(imgs, ["", "a photo of"], max_new_tokens=9, stream=lambda step, toks: seen.append(toks))
    for row in range(2):
        streamed = [s[row] for s in seen if s[row] is not None]
        assert streamed == res[row].token_ids


def test_batch_equals_unbatched_with_mixed_prompt_lengths(rt):
    imgs = _imgs(4)
    prompts = ["", "a photo of", "question: what color is the big square on the left? answer:", "red"]
    batch = rt.generate(imgs, prompts, max_new_tokens=16)
    single = [rt.generate([i], [p], max_new_tokens=16)[0] for i, p in zip(imgs, prompts)]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]


def test_prefix_reuse_runs_vision_once(tiny_bundle):
    rt = Blip2Runtime(tiny_bundle)
    img = _imgs(1)[0]
    answers = rt.ask(img, ["", "a photo of", "red"], max_new_tokens=6)
    from runtime.contract import GraphName

    assert rt.graph(GraphName.VISION).calls == 1
    assert rt.graph(GraphName.QFORMER).calls == 1
    assert answers == [rt.caption(img, p, max_new_tokens=6) for p in ["", "a photo of", "red"]]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(num_beams=0), dict(temperature=0.0),
                                 dict(top_p=1.5), dict(num_beams=2, do_sample=True), dict(top_k=-1)])
def test_bad_generation_settings_are_refused(rt, bad):
    with pytest.raises(Blip2Error):
        rt.generate(_imgs(1), [""], **bad)


def test_prompt_count_must_match_images(rt):
    with pytest.raises(Blip2Error, match="prompts for 3 images"):
        rt.generate(_imgs(3), ["a", "b"])
