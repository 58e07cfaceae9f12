"""int8 that is exact on every CPU (runtime.backends.int8_kernels).

ONNX Runtime's x86 u8 x s8 GEMM sums byte products pair-wise in int16 (``vpmaddubsw``) on CPUs without
VNNI, and saturates. The runtime measures its own kernels at load and, where they saturate, loads the
calibrated graphs with their weights in uint8 (u8u8: the same values, a kernel that cannot saturate),
or, on request, halved to 7 bits (u8s7). Every form is checked here on any CPU (the form is forced),
and on an emulated AVX2-only CPU (an AMD EPYC Rome model under qemu-user, where ORT's real AVX2
kernels run) when qemu-x86_64 is installed.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import write_calibration_images

from blip2_export.cli import main
from blip2_export.parity import list_images
from engines.build import BuildConfig, build_bundle
from runtime.backends.int8_kernels import (
    AUTO_ORDER,
    QUANTIZED_OPS,
    REDUCED_MAX,
    Int8Kernel,
    apply_weight_form,
    choose,
    halve_weights,
    probe,
    quantized_weights,
)
from runtime.contract import GraphName
from runtime.errors import Blip2Error
from runtime.pipeline import Blip2Runtime

ROOT = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")
AVX2_CPU = "EPYC-Rome"  # AMD Zen 2: AVX2, no AVX512, no VNNI (qemu 7.2's TCG runs AVX2 code)


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8-kernels")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=write_calibration_images(root / "calib")),
                 progress=False)
    return bundle


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _stages(bundle, pv, **opts):
    """(image_embeds, visual_prefix) of the int8 graphs; the Q-Former is fed the fp32 image embeds."""
    rt = Blip2Runtime(bundle, precision=opts.pop("precision", "int8"), threads=1, **opts)
    emb = rt.image_embeds(pv)
    return rt, emb


def test_halving_cannot_saturate_and_rounds_to_nearest():
    q = np.arange(-127, 128, dtype=np.int8)
    h = halve_weights(q).astype(np.int32)
    assert np.abs(h).max() == REDUCED_MAX
    assert 255 * REDUCED_MAX * 2 <= 32767  # the largest pair sum of uint8 activations x 7-bit weights
    assert np.abs(2 * h - q).max() <= 1  # nearest (ties away from zero: 127 -> 64, -3 -> -2)
    assert h[q == 127][0] == 64 and h[q == -3][0] == -2 and h[q == 1][0] == 1 and h[q == 0][0] == 0


def test_only_products_of_quantized_activations_are_rewritten(int8_bundle):
    import onnx
    from onnx import numpy_helper

    path = str(int8_bundle / "vision.int8.ort.onnx")
    vision = onnx.load(path)
    int8 = {t.name: numpy_helper.to_array(t) for t in vision.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")}
    weights = [dq.input[0] for dq in quantized_weights(vision, QUANTIZED_OPS, numpy_helper.to_array)]
    assert sorted(weights) == sorted(int8) and len(weights) == 9  # 4 linears x 2 layers + the Conv
    assert any("patch_embedding" in n for n in weights)  # the Conv too: QLinearConv saturates as well
    for kernel in (Int8Kernel.U8U8, Int8Kernel.U8S7):
        model = onnx.load(path)
        assert apply_weight_form(model, kernel, QUANTIZED_OPS, numpy_helper.to_array) == 9
        new = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for name, q in int8.items():
            scale = name.replace("_quantized", "_scale")
            if kernel is Int8Kernel.U8U8:  # the same integers, offset by the new zero point
                dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
                assert new[name].dtype == np.uint8 and (new[dq.input[2]] == 128).all()
                np.testing.assert_array_equal(new[name].astype(np.int16) - 128, q)
                np.testing.assert_array_equal(new[scale], numpy_helper.to_array(
                    next(t for t in vision.graph.initializer if t.name == scale)))
            else:
                assert new[name].dtype == np.int8 and np.abs(new[name].astype(np.int32)).max() <= REDUCED_MAX
                orig = numpy_helper.to_array(next(t for t in vision.graph.initializer if t.name == scale))
                np.testing.assert_array_equal(new[scale], orig * 2)
        onnx.checker.check_model(model)
    # the weight-only decoder takes float activations: nothing to rewrite there
    decoder = onnx.load(str(int8_bundle / "decoder.int8.onnx"))
    assert quantized_weights(decoder, QUANTIZED_OPS, numpy_helper.to_array) == []


KERNELS = ("u8s8", "u8u8", "u8s7")


def test_each_forced_form_is_the_one_that_runs(int8_bundle):
    """Forced on any CPU: the form's weights are what ORT runs (engine and portable graph alike)."""
    pv = Blip2Runtime(int8_bundle).pixel_values(list_images(None, count=2))
    f32, e32 = _stages(int8_bundle, pv, precision="fp32")
    p32 = f32.graph(GraphName.QFORMER).run({"image_embeds": e32})["visual_prefix"]
    out = {}
    for kernel in KERNELS:
        for engines in (True, False):
            rt, emb = _stages(int8_bundle, pv, int8_kernel=kernel, engines=engines)
            assert rt.graph(GraphName.VISION).facts.int8.kernel.value == kernel
            assert (rt.graph(GraphName.VISION).facts.engine is not None) == engines
            pre = rt.graph(GraphName.QFORMER).run({"image_embeds": e32})["visual_prefix"]
            out[kernel, engines] = emb, pre
    # the engine (uint8 activations) and the portable graph (int8 activations) hold the same integers
    for kernel in KERNELS:
        for i in range(2):
            a, b = out[kernel, True][i], out[kernel, False][i]
            assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(b).max()), kernel
    # u8u8 holds the very values of the weights as built; u8s7 other ones, still close to fp32
    for i in range(2):
        np.testing.assert_array_equal(out["u8u8", True][i], out["u8s8", True][i])
    assert float(np.abs(out["u8s7", True][0] - out["u8s8", True][0]).max()) > 1e-3
    for kernel in KERNELS:
        assert _cos(out[kernel, True][0], e32) >= 0.9995, kernel
        assert _cos(out[kernel, True][1], p32) >= 0.9995, kernel


def test_auto_takes_the_first_form_the_probe_finds_exact(int8_bundle):
    choice = choose("auto")
    results = {k: probe(k) for k in AUTO_ORDER}
    if all(results[Int8Kernel.U8S8].values()):
        assert choice.kernel is Int8Kernel.U8S8 and choice.ops == (), (results, choice)
    else:
        first = next(k for k in AUTO_ORDER[1:] if all(results[k].values()))
        assert choice.kernel is first and choice.ops, (results, choice)
    assert choice.reason.startswith("ONNX Runtime's u8 x s8")
    pv = Blip2Runtime(int8_bundle).pixel_values(list_images(None, count=1))
    _, auto = _stages(int8_bundle, pv)
    _, forced = _stages(int8_bundle, pv, int8_kernel=choice.kernel.value)
    np.testing.assert_array_equal(auto, forced)
    for k in KERNELS:
        assert choose(k).kernel.value == k
    with pytest.raises(Blip2Error, match="unknown int8 kernel 'u4'"):
        choose("u4")


def test_cli_shows_and_overrides_the_choice(int8_bundle, capsys):
    assert main(["inspect", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert "int8 on this CPU" in out and choose().describe() in out
    img = ROOT / "blip2_export" / "assets" / "sample_images" / "sample_0.png"
    assert main(["run", str(int8_bundle), "-i", str(img), "--precision", "int8", "--int8-kernel", "u8s7",
                 "--max-new-tokens", "3", "-v"]) == 0
    err = capsys.readouterr().err
    assert "vision: vision.int8.ort.onnx (ort, int8); int8 kernel u8s7 (requested" in err
    assert "decoder: decoder.int8.ort.onnx" in err
    assert main(["run", str(int8_bundle), "-i", str(img), "--int8-kernel", "u9"]) == 2


_EMULATED = """
import json, sys
import numpy as np
from runtime.backends.int8_kernels import Int8Kernel, probe, choose
from runtime.contract import GraphName
from runtime.generation import GenerationConfig
from runtime.pipeline import Blip2Runtime
bundle, out = sys.argv[1], sys.argv[2]
pv = np.load(out + "/pv.npy")
res = {"probe": {k: probe(Int8Kernel(k)) for k in ("u8s8", "u8u8", "u8s7")}, "choice": choose().kernel.value}
for kernel in ("auto", "u8s8", "u8s7"):
    rt = Blip2Runtime(bundle, precision="int8", int8_kernel=kernel, threads=1)
    np.save(f"{out}/vision_{kernel}_emulated.npy", rt.image_embeds(pv))
prefix = np.load(out + "/prefix.npy")
gens = rt.generate(prompts=["", "a photo of"], prefix=np.repeat(prefix, 2, 0),
                   config=GenerationConfig(max_new_tokens=12, min_new_tokens=12, num_beams=2))
res["tokens"] = [g.token_ids for g in gens]
print(json.dumps(res))
"""


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="needs qemu-x86_64 on an x86_64 host to emulate an AVX2-only CPU "
                           "(apt-get install qemu-user; .ci/run installs it)")
def test_on_an_emulated_avx2_cpu_int8_is_what_it_is_everywhere(int8_bundle, tmp_path, no_torch_env):
    """Under qemu's AVX2-only EPYC model ORT runs its real AVX2 kernels: the weights as built saturate,
    auto takes u8u8, and the result is bit for bit what a VNNI CPU computes with the weights as built
    (u8s7 too is the u8s7 of any CPU); the int8 decoder (MatMulNBits, int8 KV cache) gives the same
    tokens. Run without torch, as on an edge box."""
    from runtime.generation import GenerationConfig

    rt = Blip2Runtime(int8_bundle, precision="fp32")
    pv = rt.pixel_values(list_images(None, count=2))
    np.save(tmp_path / "pv.npy", pv)
    np.save(tmp_path / "prefix.npy", rt.image_features(pv[:1]))
    script = tmp_path / "emulated.py"
    script.write_text(_EMULATED)
    r = subprocess.run([QEMU, "-cpu", AVX2_CPU, sys.executable, str(script), str(int8_bundle), str(tmp_path)],
                       env=no_torch_env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    exact = {"MatMul": True, "Conv": True}
    assert res["probe"] == {"u8s8": {"MatMul": False, "Conv": False}, "u8u8": exact, "u8s7": exact}, res
    assert res["choice"] == "u8u8"
    here = {k: Blip2Runtime(int8_bundle, precision="int8", int8_kernel=k, threads=1).image_embeds(pv)
            for k in ("u8s8", "u8s7")}
    for emulated, native in (("auto", "u8s8"), ("u8s7", "u8s7")):
        got, want = np.load(tmp_path / f"vision_{emulated}_emulated.npy"), here[native]
        assert float(np.abs(got - want).max()) <= 1e-6 * float(np.abs(want).max()), (emulated, native)
    # what this fixes: the weights as built are far off there (saturated pair sums)
    wrong = np.load(tmp_path / "vision_u8s8_emulated.npy")
    assert float(np.abs(wrong - here["u8s8"]).max()) > 0.02 * float(np.abs(here["u8s8"]).max())
    dec = Blip2Runtime(int8_bundle, precision="int8", threads=1)
    prefix = np.load(tmp_path / "prefix.npy")
    gens = dec.generate(prompts=["", "a photo of"], prefix=np.repeat(prefix, 2, 0),
                        config=GenerationConfig(max_new_tokens=12, min_new_tokens=12, num_beams=2))
    assert res["tokens"] == [g.token_ids for g in gens]


@pytest.fixture(scope="module")
def published_width_bundle(tmp_path_factory):
    """The published blip2-opt-2.7b widths (ViT-g 1408 = 16 x 88 at 224 px, Q-Former 768, LLM 2560),
    1 LLM layer (only the vision and Q-Former graphs are quantized with calibration)."""
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import make_random_checkpoint

    root = tmp_path_factory.mktemp("published-width")
    ckpt = make_random_checkpoint(root / "ckpt", "published", seed=0, llm_layers=1, llm_ffn=2560)
    bundle = export_bundle(ckpt, root / "bundle", ExportConfig(max_context=64, max_batch=4), progress=False)
    build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=write_calibration_images(root / "calib", 12)),
                 progress=False)
    return bundle


@pytest.mark.slow
def test_int8_accuracy_at_published_widths(published_width_bundle):
    """vision and visual-prefix cosine vs fp32 >= 0.9995 in every form: u8s8 is what a VNNI CPU computes
    and (as u8u8, the same values) an AVX2-only one; u8s7 is exact there too."""
    bundle = published_width_bundle
    f32 = Blip2Runtime(bundle, precision="fp32", threads=2)
    pv = f32.pixel_values(list_images(None, count=16)[12:])  # held out from the 12 calibration images
    e32 = f32.image_embeds(pv)
    p32 = f32.graph(GraphName.QFORMER).run({"image_embeds": e32})["visual_prefix"]
    assert e32.shape[-1] == 1408 and p32.shape[-1] == 2560
    for kernel in KERNELS:
        rt = Blip2Runtime(bundle, precision="int8", int8_kernel=kernel, threads=2)
        emb = rt.image_embeds(pv)
        pre = rt.image_features(pv)  # int8 vision -> int8 Q-Former, as parity's visual_prefix stage
        assert _cos(emb, e32) >= 0.9995, (kernel, _cos(emb, e32))
        assert _cos(pre, p32) >= 0.9995, (kernel, _cos(pre, p32))
