"""Several questions about one frame: vision and Q-Former run once, for both LLM families.

``Blip2Runtime.ask(image, prompts)`` computes the visual prefix once and answers every prompt in one
batch; its answers are the ones each prompt gets on its own.
"""

from __future__ import annotations

import pytest

from blip2_export.parity import list_images
from runtime.contract import GraphName
from runtime.pipeline import Blip2Runtime

IMAGE = list_images(None, count=1)[0]
PROMPTS = ["", "a photo of", "Question: what is in the picture? Answer:", "Question: what color is it? Answer:"]


@pytest.fixture(scope="module", params=["opt", "t5"])
def runtime(request, tmp_path_factory):
    if request.param == "opt":
        bundle = request.getfixturevalue("tiny_bundle")
    else:
        from test_t5 import build_t5

        bundle = build_t5(tmp_path_factory, "tiny")[1]
    return Blip2Runtime(bundle, threads=1)


def _calls(rt: Blip2Runtime) -> dict[str, int]:
    return {g.value: rt.graph(g).calls for g in (GraphName.VISION, GraphName.QFORMER)}


def test_ask_runs_vision_and_qformer_once(runtime):
    rt = runtime
    before = _calls(rt)
    answers = rt.ask(IMAGE, PROMPTS, max_new_tokens=8)
    after = _calls(rt)
    assert {k: after[k] - before[k] for k in after} == {"vision": 1, "qformer": 1}
    assert len(answers) == len(PROMPTS)
    alone = [rt.caption(IMAGE, p, max_new_tokens=8) for p in PROMPTS]  # the slow way: one image pass each
    assert _calls(rt)["vision"] - after["vision"] == len(PROMPTS)
    assert answers == alone


def test_prefix_reused_across_calls(runtime):
    """Image features computed once can serve later requests without touching vision or Q-Former."""
    rt = runtime
    prefix = rt.image_features([IMAGE])
    before = _calls(rt)
    first = rt.generate(prefix=prefix, prompts=PROMPTS[:2], max_new_tokens=6)
    second = rt.generate(prefix=prefix, prompts=PROMPTS[2:], max_new_tokens=6, num_beams=2)
    assert _calls(rt) == before
    assert len(first) == 2 and len(second) == 2
    assert all(g.token_ids for g in first + second)
