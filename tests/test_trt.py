"""TensorRT engines for the tiny bundle, built and checked for parity. Needs TensorRT and a CUDA GPU.

``tensorrt-stubs`` make ``import tensorrt`` succeed without the library, so the skip checks for the
real module (``runtime.backends.trt.tensorrt_status``), and for a GPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.backends.trt import tensorrt_status

_reason = tensorrt_status()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(_reason is not None,
                                                  reason=f"needs TensorRT and a CUDA GPU: {_reason}")]


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory):
    from engines.build import BuildConfig, build_bundle

    root = tmp_path_factory.mktemp("trt")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cache = root / "timing.cache"
    for precision in ("fp32", "fp16"):
        build_bundle(bundle, BuildConfig(precision=precision, backend="trt", max_batch=4, max_context=96,
                                         timing_cache=cache), progress=False)
    assert cache.is_file() and cache.stat().st_size > 0
    return bundle


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engines_recorded_and_parity(trt_bundle, tiny_checkpoint, tiny_model, precision):
    from blip2_export.parity import THRESHOLDS, list_images, run_parity
    from runtime.backends.trt import current_device
    from runtime.manifest import load_manifest

    m = load_manifest(trt_bundle)
    dev = current_device()
    for rec in m.graphs[precision].values():
        (engine,) = [e for e in rec.engines if e.backend == "trt"]
        assert (engine.device_name, engine.compute_capability, engine.backend_version) == \
            (dev.name, dev.compute_capability, dev.backend_version)
        assert engine.profile["batch"] == [1, 1, 4]
    rep = run_parity(tiny_checkpoint, trt_bundle, images=list_images(None, count=2), precision=precision,
                     backend="trt", model_and_tokenizer=tiny_model)
    assert rep.token_agreement >= THRESHOLDS[precision].token_agreement, rep.render()
    assert not rep.nonfinite


def test_int8_engine_builds_from_qdq_graph(trt_bundle, tmp_path):
    from blip2_export.parity import THRESHOLDS, list_images
    from engines.build import BuildConfig, build_bundle
    from runtime.pipeline import Blip2Runtime

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(list_images(None, count=2)):
        img.save(calib / f"{i}.png")
    build_bundle(trt_bundle, BuildConfig(precision="int8", backend="trt", calib_images=calib, max_batch=4,
                                         max_context=96), progress=False)
    rt = Blip2Runtime(trt_bundle, precision="int8", backend="trt")
    images = list_images(None, count=2)
    out = rt.generate(images, "", max_new_tokens=4)
    assert all(len(o.token_ids) == 4 or o.finished for o in out)
    # the engine computes what ONNX Runtime computes from the same Q/DQ graphs (both int8, int32 sums)
    ort = Blip2Runtime(trt_bundle, precision="int8", backend="ort", engines=False)
    got, want = rt.image_features(images).astype(np.float64), ort.image_features(images).astype(np.float64)
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= THRESHOLDS["int8"].stage_cosine, cosine
