"""A decoder-only LLM with grouped-query attention (a LLaMA-style BLIP-2: 4 query heads, 2 key/value heads):
its facts are read the way transformers reads them, the KV cache is as wide as the key/value heads, and the
exported bundle generates what the eager model generates."""

from __future__ import annotations

import json

import pytest

from blip2_export.export import export_bundle
from blip2_export.modelzoo import make_random_checkpoint
from blip2_export.parity import run_parity


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    ckpt = make_random_checkpoint(root / "ckpt", "tiny", llm="llama", llm_hidden=64, llm_heads=4, llm_kv_heads=2,
                                  llm_ffn=128)
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, progress=False)
    return ckpt, bundle


def test_kv_heads_and_query_heads_are_separate_facts(gqa):
    _, bundle = gqa
    m = json.loads((bundle / "manifest.json").read_text())
    assert (m["model"]["llm_heads"], m["model"]["llm_query_heads"], m["model"]["head_dim"]) == (2, 4, 16)
    dec = m["graphs"]["fp32"]["decoder"]["io"]
    past = next(t for t in dec["inputs"] if t["name"] == "past.0.key")
    assert past["dims"][1] == 2  # the cache holds the key/value heads only


def test_gqa_bundle_generates_what_the_eager_model_generates(gqa):
    ckpt, bundle = gqa
    rep = run_parity(ckpt, bundle, max_new_tokens=8)
    assert rep.ok, rep.to_json()
    assert rep.generations and rep.exact_sequences == len(rep.generations)
