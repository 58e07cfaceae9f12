"""fp16 / int8 builds of retrieval bundles: calibration runs the retrieval graphs, parity per precision."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from blip2_export.parity import THRESHOLDS
from engines.build import BuildConfig, build_bundle
from runtime.errors import Blip2Error
from runtime.manifest import load_manifest
from runtime.retrieval import RetrievalRuntime


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    from blip2_export.export import export_bundle
    from blip2_export.modelzoo import make_random_retrieval_checkpoint

    root = tmp_path_factory.mktemp("rprec")
    ck = make_random_retrieval_checkpoint(root / "ckpt")
    bundle = export_bundle(ck, root / "bundle", progress=False)
    calib = root / "calib"
    calib.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    (root / "captions.txt").write_text("a red circle\ntwo blue squares on the left\nthree small green triangles\n")
    return ck, bundle, calib


def test_fp16_retrieval_build_passes_parity(retrieval):
    from blip2_export.parity import list_images, run_retrieval_parity

    ck, bundle, _ = retrieval
    build_bundle(bundle, BuildConfig(precision="fp16", backend="ort"), progress=False)
    rep = run_retrieval_parity(ck, bundle, images=list_images(None, count=4), precision="fp16")
    assert rep.ok, rep.render()
    assert all(s.cosine >= 0.999 for s in rep.stages)


def test_int8_retrieval_build_needs_captions(retrieval, tmp_path):
    """The captioning prompts are no calibration for a text encoder that embeds captions: refused up front."""
    _, bundle, calib = retrieval
    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(Blip2Error, match="needs captions") as e:
        build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=calib), progress=False)
    assert "--calib-prompts" in str(e.value)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(Blip2Error, match="has no captions"):
        build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=calib, calib_prompts=blank),
                     progress=False)
    assert sorted(p.name for p in bundle.iterdir()) == before


def test_int8_retrieval_build_calibrates_every_graph(retrieval):
    ck, bundle, calib = retrieval
    build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=calib,
                                     calib_prompts=calib.parent / "captions.txt"), progress=False)
    m = load_manifest(bundle)
    assert set(m.graphs["int8"]) == set(m.graphs["fp32"])
    rt8, rt32 = RetrievalRuntime(bundle, precision="int8"), RetrievalRuntime(bundle)
    imgs = [np.random.default_rng(9).integers(0, 256, (40, 40, 3), dtype=np.uint8)]
    texts = ["a red circle", "two blue squares on the left"]
    i8, i32 = rt8.encode_images(imgs), rt32.encode_images(imgs)
    t8, t32 = rt8.encode_texts(texts), rt32.encode_texts(texts)
    s8, s32 = rt8.similarity(i8, t8), rt32.similarity(i32, t32)
    assert np.isfinite(s8).all()

    def cos(a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    # features within the int8 stage threshold; similarities (cosines, spread ~0.08 between these two
    # texts) within 0.02 (measured 0.0065) and ranked the same
    assert cos(i8.feats, i32.feats) >= THRESHOLDS["int8"].stage_cosine
    assert cos(t8.feats, t32.feats) >= THRESHOLDS["int8"].stage_cosine
    assert np.abs(s8 - s32).max() < 0.02
    assert (s8.argmax(axis=1) == s32.argmax(axis=1)).all()
