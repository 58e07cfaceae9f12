"""Stage-1 retrieval (``Blip2ForImageTextRetrieval``): export, torch-free runtime, CLI and parity with HF.

ITC similarities and ITM logits match transformers within 1e-4 and every ranking is identical; the
ITM re-ranking follows the paper's evaluation (top k by ITC, then ITM match logit + ITC); a fixed
caption set is encoded once and reused from disk.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from blip2_export.parity import DEFAULT_CAPTIONS, list_images, run_retrieval_parity
from runtime.contract import Family, GraphName
from runtime.errors import BundleError, InputError, LimitError
from runtime.retrieval import RetrievalRuntime, TextSet, itc_similarity, rank

IMAGES = list_images(None, count=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """(checkpoint, bundle, loaded model) of a tiny random stage-1 model, exported by the generic exporter."""
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import load_retrieval_checkpoint, make_random_retrieval_checkpoint

    root = tmp_path_factory.mktemp("retrieval")
    ck = make_random_retrieval_checkpoint(root / "ckpt", "tiny", seed=0)
    bundle = export_bundle(ck, root / "bundle", ExportConfig(max_context=48, max_batch=8), progress=False)
    return ck, bundle, load_retrieval_checkpoint(ck)


@pytest.fixture(scope="module")
def rt(retrieval):
    return RetrievalRuntime(retrieval[1], threads=1)


# -- export -------------------------------------------------------------------------------------------
def test_export_detects_retrieval_checkpoint(retrieval):
    from runtime.manifest import load_manifest

    m = load_manifest(retrieval[1])
    assert m.family is Family.RETRIEVAL
    assert set(m.graphs["fp32"]) == {"vision", "image_features", "text_features", "itm"}
    for name, rec in m.graphs["fp32"].items():
        exp = m.expected_io(name)
        assert (rec.io.input_names(), rec.io.output_names()) == (exp.input_names(), exp.output_names())
    cfg = retrieval[2][0].config
    assert m.model.embed_dim == cfg.image_text_hidden_size and m.model.num_query_tokens == cfg.num_query_tokens
    assert m.dims["text"].max == 48 and m.dims["batch"].max == 8
    assert "tokenizer" in m.files and "embed_tokens" not in m.files


def test_captioning_loader_refuses_retrieval_checkpoint(retrieval):
    from blip2_export.modelzoo import load_checkpoint
    from runtime.errors import Blip2Error

    with pytest.raises(Blip2Error, match="retrieval checkpoint"):
        load_checkpoint(retrieval[0])


# -- parity ---------------------------------------------------------------------------------------------
def test_parity_with_transformers(retrieval):
    ck, bundle, loaded = retrieval
    rep = run_retrieval_parity(ck, bundle, images=IMAGES, texts=DEFAULT_CAPTIONS, rerank_top_k=4,
                               model_and_tokenizer=loaded, threads=1)
    assert rep.itc_max_abs <= 1e-4 and rep.itm_max_abs <= 1e-4, rep.render()
    assert rep.itc_rankings_equal and rep.reranked_equal
    assert all(s.ok for s in rep.stages) and rep.ok


def test_scores_are_not_degenerate(rt):
    """Rankings mean something only if scores differ across images and texts."""
    imgs, txts = rt.encode_images(IMAGES), rt.encode_texts(DEFAULT_CAPTIONS)
    itc = rt.similarity(imgs, txts)
    assert itc.std(axis=1).min() > 1e-3 and itc.std(axis=0).min() > 1e-3
    best = {int(np.argmax(row)) for row in itc}
    assert len(best) >= 2
    itm = rt.itm(imgs, txts, [(i, j) for i in range(3) for j in range(3)])[:, 1]
    assert np.ptp(itm) > 1e-2


def test_batched_texts_and_pairs_equal_single(rt):
    """Right padding inside a batch changes nothing: features and ITM logits equal one-at-a-time results."""
    texts = list(DEFAULT_CAPTIONS)
    together = rt.encode_texts(texts)
    alone = np.concatenate([rt.encode_texts([t]).feats for t in texts])
    np.testing.assert_allclose(together.feats, alone, atol=1e-5)
    imgs = rt.encode_images(IMAGES[:2])
    pairs = [(i, j) for i in range(2) for j in range(len(texts))]
    many = rt.itm(imgs, together, pairs)
    one = np.concatenate([rt.itm(imgs, together, [p]) for p in pairs])
    np.testing.assert_allclose(many, one, atol=1e-5)


# -- ranking ------------------------------------------------------------------------------------------
def test_itc_is_max_over_queries():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 4, 5))
    txt = rng.normal(size=(2, 5))
    expect = np.array([[max(img[i, q] @ txt[j] for q in range(4)) for j in range(2)] for i in range(3)])
    np.testing.assert_allclose(itc_similarity(img, txt), expect, rtol=1e-5)


def test_rerank_only_top_k_by_itm_plus_itc():
    itc = np.array([[0.9, 0.8, 0.7, 0.1]])
    itm_logits = {(0, 0): -1.0, (0, 1): 0.5, (0, 2): 5.0, (0, 3): 9.0}
    asked = []

    def itm(pairs):
        asked.extend(pairs)
        return np.array([itm_logits[p] for p in pairs])

    out = rank(itc, 2, itm)[0]
    assert asked == [(0, 0), (0, 1)]  # only the ITC top 2 go through ITM
    assert [m.index for m in out] == [1, 0, 2, 3]  # 0.5+0.8 > -1+0.9; the rest keep ITC order
    assert out[0].score == pytest.approx(1.3) and out[2].itm is None and out[2].score == pytest.approx(0.7)
    assert [m.index for m in rank(itc, 0, itm)[0]] == [0, 1, 2, 3]


def test_retrieve_counts_itm_pairs_once(rt):
    imgs, txts = rt.encode_images(IMAGES[:3]), rt.encode_texts(DEFAULT_CAPTIONS[:4])
    itm = rt.graph(GraphName.ITM)
    before = itm.calls
    res = rt.retrieve(imgs, txts, rerank_top_k=4)  # every pair is a candidate both ways: 12 pairs, 2 chunks
    assert itm.calls - before == 2
    assert len(res.i2t) == 3 and len(res.t2i) == 4
    assert all(m.itm is not None for row in res.i2t for m in row)
    for i, row in enumerate(res.i2t):  # i2t and t2i see the same pair scores
        for m in row:
            back = next(x for x in res.t2i[m.index] if x.index == i)
            assert back.score == pytest.approx(m.score)


# -- text features computed once ---------------------------------------------------------------------
def test_text_features_saved_and_reused(rt, tmp_path):
    txts = rt.encode_texts(DEFAULT_CAPTIONS)
    path = tmp_path / "caps.npz"
    txts.save(path)
    calls = rt.graph(GraphName.TEXT_FEATURES).calls
    loaded = rt.load_texts(path)
    assert rt.graph(GraphName.TEXT_FEATURES).calls == calls  # no text graph run
    assert loaded.texts == list(DEFAULT_CAPTIONS) and loaded.ids == txts.ids
    np.testing.assert_array_equal(loaded.feats, txts.feats)
    imgs = rt.encode_images(IMAGES[:2])
    a, b = rt.retrieve(imgs, txts), rt.retrieve(imgs, loaded)
    assert [[m.index for m in r] for r in a.i2t] == [[m.index for m in r] for r in b.i2t]


def test_text_features_from_another_bundle_are_refused(rt, tmp_path):
    txts = rt.encode_texts(["a red car"])
    path = tmp_path / "caps.npz"
    TextSet(txts.texts, txts.ids, txts.feats, "some-other-bundle").save(path)
    with pytest.raises(InputError, match="another bundle"):
        rt.load_texts(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a text features file"):
        rt.load_texts(tmp_path / "junk.npz")


def test_input_errors(rt, tiny_bundle):
    with pytest.raises(LimitError, match="at most 48"):
        rt.encode_texts(["a " * 60])
    with pytest.raises(InputError):
        rt.encode_texts([])
    with pytest.raises(BundleError, match="not a retrieval bundle"):
        RetrievalRuntime(tiny_bundle)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_retrieve(retrieval, tmp_path, capsys):
    from blip2_export.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(IMAGES[:3]):
        im.save(folder / f"img{i}.png")
    caps = tmp_path / "caps.txt"
    caps.write_text("a photo of a cat\n\na red car\ntwo dogs on the table\n")
    feats = tmp_path / "caps.npz"
    bundle = str(retrieval[1])
    assert main(["retrieve", bundle, "--images", str(folder), "--texts", str(caps), "--rerank-top-k", "2",
                 "--save-text-features", str(feats), "--json", "--threads", "1"]) == 0
    first = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in first] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(r["texts"]) == 3 and r["texts"][0]["itm"] is not None for r in first)
    assert main(["retrieve", bundle, "--images", str(folder), "--text-features", str(feats), "--json",
                 "--rerank-top-k", "2", "--direction", "both", "--threads", "1"]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert again[:3] == first and len(again) == 6 and again[3]["text"] == "a photo of a cat"
    assert main(["retrieve", bundle, "--images", str(folder)]) == 2
    assert "--texts" in capsys.readouterr().err


def test_cli_parity_on_retrieval_bundle(retrieval):
    """``blip2-export parity`` picks the retrieval comparison from the bundle's family (the closing note's command)."""
    ck, bundle, _ = retrieval
    proc = subprocess.run([sys.executable, "-m", "blip2_export.cli", "parity", str(ck), str(bundle)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ITC rankings (image->text and text->image) identical: yes" in proc.stdout
    assert proc.stdout.rstrip().endswith("PASS")


def test_cli_retrieve_without_torch(retrieval, tmp_path, no_torch_env):
    """The retrieval runtime and CLI work where torch and transformers cannot be imported (edge boxes)."""

    folder = tmp_path / "imgs"
    folder.mkdir()
    IMAGES[0].save(folder / "a.png")
    caps = tmp_path / "caps.txt"
    caps.write_text("a red car\nblue sky\n")
    env = no_torch_env
    proc = subprocess.run([sys.executable, "-m", "blip2_export.cli", "retrieve", str(retrieval[1]), "--images",
                           str(folder), "--texts", str(caps), "--json", "--threads", "1"],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["image"] == "a.png" and {t["text"] for t in row["texts"]} == {"a red car", "blue sky"}


def test_generation_runtime_refuses_retrieval_bundle(retrieval):
    from runtime.errors import Blip2Error
    from runtime.pipeline import Blip2Runtime

    with pytest.raises(Blip2Error, match="retrieval bundle.*blip2-export retrieve"):
        Blip2Runtime(retrieval[1])
