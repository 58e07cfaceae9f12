"""fp16 and int8 as ONNX transforms (engines/), run and checked for parity through ONNX Runtime on CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from bundle_tools import write_calibration_images

from blip2_export.parity import THRESHOLDS, list_images, run_parity
from engines.build import BuildConfig, build_bundle
from runtime.contract import GraphName
from runtime.errors import InputError
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime

PROMPTS = ("", "Question: what is in the picture? Answer:")


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory):
    """The tiny bundle with fp16 and int8 graphs added (built once for this module)."""
    root = tmp_path_factory.mktemp("precision")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    reports = {
        "fp16": build_bundle(bundle, BuildConfig(precision="fp16", backend="ort"), progress=False),
        "int8": build_bundle(bundle, BuildConfig(precision="int8", backend="ort",
                                                 calib_images=write_calibration_images(root / "calib")), progress=False),
    }
    return bundle, reports


def _weight_bytes(path) -> int:
    import onnx

    return sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)


def test_manifest_records_precision_io_and_islands(built):
    bundle, _ = built
    m = load_manifest(bundle)  # checksums of the new files verified too
    assert m.precisions() == ["fp32", "fp16", "int8"]
    dec16 = m.graph("decoder", "fp16")
    dtypes = {t.name: t.dtype for t in (*dec16.io.inputs, *dec16.io.outputs)}
    assert dtypes["inputs_embeds"] == "float16" and dtypes["past.0.key"] == "float16"
    assert dtypes["present.1.value"] == "float16" and dtypes["logits"] == "float32"
    assert m.graph("vision", "fp16").io.inputs[0].dtype == "float16"
    assert dec16.notes["fp32_op_counts"]["LayerNormalization"] > 0
    assert dec16.notes["fp32_op_counts"]["Softmax"] > 0
    assert any("lm_head" in n for n in dec16.notes["fp32_nodes"])  # logits computed in fp32
    assert m.graph("qformer", "fp16").notes["fp32_compute"].startswith("whole graph")
    vis8, dec8 = m.graph("vision", "int8"), m.graph("decoder", "int8")
    assert vis8.notes["recipe"] == "static" and vis8.notes["quantize_linear_nodes"] > 0
    assert vis8.notes["calibration"]["samples"] == 4
    assert dec8.notes["recipe"] == "weight" and dec8.notes["linear_layers_quantized"] > 0
    assert dec8.notes["kept_float32"]["nodes"] == []  # the LM head's weight is int8 too (its output stays fp32)
    # ORT builds: calibrated graphs with uint8 activations, the decoder with MatMulNBits + fused attention
    for name in ("vision", "qformer"):
        info = m.graph(name, "int8").notes["ort_engine"]
        assert info["file"] == f"{name}.int8.ort.onnx" and info["activation_pairs"] > 0
    eng8 = dec8.notes["ort_engine"]
    assert eng8["int8_matmul"]["layers"] == dec8.notes["linear_layers_quantized"]
    # the MLP's flatten/restore reshapes are gone (MatMulNBits takes [batch, seq, hidden]); q|k|v packed
    assert eng8["row_reshapes_dropped"] == eng8["qkv_packed"] == m.model.llm_layers
    assert eng8["kv_dtype"] == "int8" and eng8["kv_quant"]["layers"] == m.model.llm_layers
    assert {t.dtype for t in dec8.io.inputs if t.name != "attention_mask" and t.name != "position_ids"} == {"float32"}


def test_fp16_graph_types(built):
    import onnx

    bundle, _ = built
    model = onnx.load(str(bundle / "decoder.fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT16 and types["logits"] == onnx.TensorProto.FLOAT
    prod = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):  # fed through a Cast to fp32
            src = prod.get(n.input[0])
            assert src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT, n.name
    onnx.checker.check_model(model)


def test_weights_shrink_by_expected_factor(built, tiny_bundle):
    bundle, reports = built
    for name in ("vision", "qformer", "decoder"):
        w32 = _weight_bytes(tiny_bundle / f"{name}.onnx")
        assert _weight_bytes(bundle / f"{name}.fp16.onnx") <= 0.55 * w32, name
        # the tiny decoder's fp32 position table is a third of its weights (0.54 here); mid reaches 0.27
        assert _weight_bytes(bundle / f"{name}.int8.onnx") <= (0.58 if name == "decoder" else 0.45) * w32, name
    sizes = {s.graph: s for s in reports["fp16"].sizes}
    assert sizes["vision"].fp32_bytes > sizes["vision"].bytes > 0
    assert "vision.fp16.onnx" in reports["fp16"].render()


def test_fp16_parity_on_tiny(built, tiny_checkpoint, tiny_model):
    bundle, _ = built
    rep = run_parity(tiny_checkpoint, bundle, images=list_images(None, count=3), prompts=PROMPTS,
                     precision="fp16", model_and_tokenizer=tiny_model)
    assert not rep.nonfinite
    assert all(s.cosine >= 0.999 for s in rep.stages), rep.render()
    assert rep.token_agreement >= THRESHOLDS["fp16"].token_agreement, rep.render()
    assert rep.ok


def test_int8_parity_on_tiny(built, tiny_checkpoint, tiny_model):
    bundle, _ = built
    rep = run_parity(tiny_checkpoint, bundle, images=list_images(None, count=3), prompts=PROMPTS,
                     precision="int8", model_and_tokenizer=tiny_model)
    assert not rep.nonfinite
    assert all(s.cosine >= THRESHOLDS["int8"].stage_cosine for s in rep.stages), rep.render()
    # Teacher-forced logits stay close; on this random 2-layer model near-tied logits flip some tokens.
    assert max(g.max_logits_diff for g in rep.generations) < 0.2, rep.render()
    assert rep.token_agreement >= THRESHOLDS["int8"].token_agreement, rep.render()


def test_int8_ort_engines_compute_what_the_portable_graphs_compute(built):
    """The uint8-activation ORT builds of the calibrated vision / Q-Former graphs are loaded by default and
    give the portable int8 graphs' values (same integers), at the speed of ORT's VNNI kernels."""
    bundle, _ = built
    fast, plain = (Blip2Runtime(bundle, precision="int8", engines=e, threads=1) for e in (True, False))
    assert fast.graph(GraphName.VISION).facts.engine == "vision.int8.ort.onnx"
    assert plain.graph(GraphName.VISION).facts.engine is None
    assert fast.graph(GraphName.QFORMER).facts.engine == "qformer.int8.ort.onnx"
    pv = fast.pixel_values(list_images(None, count=2))
    emb = [rt.image_embeds(pv) for rt in (fast, plain)]
    scale = float(np.abs(emb[1]).max())
    assert float(np.abs(emb[0] - emb[1]).max()) < 1e-3 * scale
    pre = [rt.graph(GraphName.QFORMER).run({"image_embeds": emb[1]})["visual_prefix"] for rt in (fast, plain)]
    assert float(np.abs(pre[0] - pre[1]).max()) < 1e-3 * float(np.abs(pre[1]).max())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_padded_batch_is_finite_and_matches_single_rows(built, precision, monkeypatch):
    from runtime.backends.ort import OrtBinding

    bundle, _ = built
    rt = Blip2Runtime(bundle, precision=precision)
    images = list_images(None, count=2)
    prompts = ["", "Question: what is in the picture? Answer:"]
    decoder = rt.graph(rt.manifest.required_graphs()[-1])
    assert decoder.facts.engine is not None  # the default: the ORT engine, run through its IO binding
    checked = []
    real_run = OrtBinding.run

    def run_and_check(binding):  # every decoder run's logits and cache, padded rows included
        out = real_run(binding)
        if binding.graph is decoder:
            for name, value in {**binding._keep, **out}.items():
                if name.startswith(("out:", "logits", "past.")) and value.dtype.kind == "f":
                    assert np.isfinite(value.astype(np.float32)).all(), name
                    checked.append(name)
        return out

    monkeypatch.setattr(OrtBinding, "run", run_and_check)
    batch = rt.generate(images, prompts, max_new_tokens=8)
    monkeypatch.undo()
    assert any(n.startswith("out:logits") or n == "logits" for n in checked)
    assert any("past." in n for n in checked) == (np.dtype(decoder.facts.kv_dtype or "float32").kind == "f")  # an int8 cache is integers
    for img, prompt, got in zip(images, prompts, batch):
        assert rt.generate([img], [prompt], max_new_tokens=8)[0].token_ids == got.token_ids


def _teacher_forced_int8(bundle, steps=8):
    """Logits of prefill + ``steps`` fixed tokens through the int8 ORT engine, and the final state."""
    from runtime.decoder_only import DecoderOnlyModel

    rt = Blip2Runtime(bundle, precision="int8", threads=1)
    m = rt.manifest.model
    prompts = [[7, 8, 9, 10], [12]]
    prefix = np.random.default_rng(0).normal(size=(2, m.num_query_tokens, m.llm_hidden)).astype(np.float32)
    sm = DecoderOnlyModel(rt.manifest, rt.graph(GraphName.DECODER), rt.embed, prefix, prompts,
                          max_new_tokens=steps)
    logits, state = sm.prefill()
    out = [logits]
    for k in range(steps):
        logits, state = sm.step(np.array([20 + k, 30 + k]), state)
        out.append(logits)
    return np.stack(out), state, rt.graph(GraphName.DECODER)


def test_int8_kv_cache_against_an_fp32_cache(built, tmp_path):
    """The default int8 engine stores its KV cache in int8 (a quarter of the bytes) with calibrated
    per-channel scales; --ort-kv-cache fp32 keeps it exact. Both give nearly the same logits."""
    bundle, _ = built
    exact = tmp_path / "exact"
    shutil.copytree(bundle, exact)
    build_bundle(exact, BuildConfig(precision="int8", backend="ort", calib_images=write_calibration_images(tmp_path / "calib"),
                                    ort_kv_cache="fp32", force=True), progress=False)
    assert "kv_dtype" not in load_manifest(exact).graph("decoder", "int8").notes["ort_engine"]
    q8, s8, dec8 = _teacher_forced_int8(bundle)
    q32, s32, dec32 = _teacher_forced_int8(exact)
    assert dec8.facts.kv_dtype == "int8" and dec32.facts.kv_dtype is None  # None: the graph's float type
    k8, k32 = s8.past["past.0.key"], s32.past["past.0.key"]
    assert k8.dtype == np.int8 and k32.dtype == np.float32 and k8.shape == k32.shape and 4 * k8.nbytes == k32.nbytes
    assert np.abs(k8[:, :, :5].astype(np.int32)).max() > 16  # the scales use the int8 range
    assert not np.array_equal(q8, q32)  # the cache really is quantized ...
    a, b = q8.reshape(-1, q8.shape[-1]), q32.reshape(-1, q32.shape[-1])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.995, cos  # ... and close to the exact cache at every step
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_kv_scales_from_calibration_peaks():
    from engines.calibration import CalibrationSet
    from engines.ort_optimize import KV_INT8_MARGIN, kv_cache_scales
    from runtime.errors import Blip2Error

    cal = CalibrationSet()
    a = np.zeros((1, 2, 3, 4), np.float32)
    a[0, 1, 2, 3] = -5.0  # head 1, channel 3, at the newest position
    b = np.full((2, 2, 1, 4), 0.5, np.float32)
    b[1, 0, 0, 0] = 2.0
    for out in ({"present.0.key": a, "present.0.value": b, "logits": np.ones((1, 1, 9))},
                {"present.0.key": b, "present.0.value": a}):
        cal.observe_kv(out)
    assert set(cal.kv_peak) == {"past.0.key", "past.0.value"}
    np.testing.assert_array_equal(cal.kv_peak["past.0.key"], [[2.0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 5.0]])
    scales = kv_cache_scales(cal.kv_peak, layers=1)
    assert scales["past.0.key"].shape == (2, 1, 4) and scales["past.0.key"].dtype == np.float32
    assert scales["past.0.key"][1, 0, 3] == pytest.approx(5.0 * KV_INT8_MARGIN / 127)
    cal.kv_peak["past.0.value"][0, 1] = 0.0  # a channel that never moved still gets a positive scale
    assert kv_cache_scales(cal.kv_peak, layers=1)["past.0.value"].min() > 0
    with pytest.raises(Blip2Error, match="past.1.key.*--ort-kv-cache fp32"):
        kv_cache_scales(cal.kv_peak, layers=2)


def test_manifest_that_misstates_the_kv_cache_type_is_refused(built, tmp_path):
    """The engine notes say how the cache is stored; a manifest that does not match the graph is refused
    at load instead of feeding it float buffers."""
    from runtime.errors import Blip2Error

    bundle, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    raw = json.loads((bad / "manifest.json").read_text())
    del raw["graphs"]["int8"]["decoder"]["notes"]["ort_engine"]["kv_dtype"]
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Blip2Error, match=r"past\.0\.key is tensor\(int8\), the manifest says tensor\(float\)"):
        Blip2Runtime(bad, precision="int8", threads=1).graph(GraphName.DECODER)


def test_cli_run_after_build(built, tmp_path):
    from blip2_export.cli import main

    bundle, _ = built
    img = tmp_path / "x.png"
    list_images(None, count=1)[0].save(img)
    for precision in ("fp16", "int8"):
        assert main(["run", str(bundle), "--precision", precision, "--image", str(img), "--json",
                     "--max-new-tokens", "4"]) == 0


def test_percentile_and_entropy_calibration(bundle_copy, tmp_path):
    """Every --calib-method builds; the method used (and any fallback) is written to the manifest."""
    calib = write_calibration_images(tmp_path / "calib", n=2)
    for method in ("minmax", "entropy"):
        build_bundle(bundle_copy, BuildConfig(precision="int8", backend="ort", calib_images=calib,
                                              calib_method=method, llm_int8="static", force=True),
                     progress=False)
        m = load_manifest(bundle_copy)
        vis = m.graph("vision", "int8").notes["calibration"]
        assert vis["method"] == method or vis["fallback"].startswith(method)
        dec = m.graph("decoder", "int8").notes
        assert dec["recipe"] == "static" and dec["quantize_linear_nodes"] > 0
        assert dec["calibration"]["samples"] > 2  # prefill and decode steps, with a real KV cache


def test_unreadable_calibration_image_leaves_bundle_untouched(bundle_copy, tmp_path):
    calib = write_calibration_images(tmp_path / "calib", n=1)
    (calib / "broken.jpg").write_bytes(b"not a jpeg")
    before = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    with pytest.raises(InputError, match="broken.jpg"):
        build_bundle(bundle_copy, BuildConfig(precision="int8", backend="ort", calib_images=calib), progress=False)
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir()} == before


def test_crash_while_writing_graphs_leaves_bundle_untouched(bundle_copy, monkeypatch):
    import engines.build as eb

    calls = []
    real = eb.save_streaming  # how build writes each transformed graph

    def flaky(model, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, path, **kw)

    monkeypatch.setattr(eb, "save_streaming", flaky)
    before = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        build_bundle(bundle_copy, BuildConfig(precision="fp16", backend="ort"), progress=False)
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir()} == before
    assert "fp16" not in json.loads((bundle_copy / "manifest.json").read_text())["graphs"]


def test_fp16_on_an_x86_cpu_says_it_runs_as_fp32_once(built, tmp_path, capsys):
    import platform

    from blip2_export.cli import main

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ONNX Runtime has fp16 CPU kernels on ARM; the warning is for x86 only")
    bundle, _ = built
    image = tmp_path / "x.png"
    list_images(None, count=1)[0].save(image)
    for precision, expected in (("fp16", 1), ("int8", 0), ("fp32", 0)):
        code = main(["run", str(bundle), "--precision", precision, "--image", str(image), "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert code == 0 and len(warnings) == expected, (precision, err)
        if expected:
            assert "runs as fp32" in warnings[0] and "--precision fp32" in warnings[0]


# -- accuracy-aware fallback (--int8-tolerance) ----------------------------------------------------
@pytest.fixture(scope="module")
def vision_calibration(tiny_bundle, tmp_path_factory):
    from engines.calibration import collect, list_calibration_images

    calib = write_calibration_images(tmp_path_factory.mktemp("fallback-calib"), n=4)
    cal = collect(tiny_bundle, list_calibration_images(calib), ("",), decode_steps=1)
    return cal.feeds["vision"]


def _quantize_vision(tiny_bundle, feeds, tolerance):
    from engines.int8 import CalibMethod, quantize_static_graph

    io = load_manifest(tiny_bundle).graph("vision", "fp32").io
    return quantize_static_graph(tiny_bundle / "vision.onnx", "vision", io, feeds, CalibMethod.MINMAX,
                                 tolerance=tolerance)


def test_linear_blocks_follow_the_transformer_blocks(tiny_bundle):
    import onnx

    from engines.int8 import QUANT_OPS, linear_blocks

    model = onnx.load(str(tiny_bundle / "vision.onnx"))
    nodes = [n.name for n in model.graph.node if n.op_type in QUANT_OPS]
    blocks = linear_blocks(model, nodes)
    assert sorted(sum(blocks, [])) == sorted(nodes)
    assert blocks[0] == [n for n in nodes if "patch_embedding" in n]  # outside any block: a group of its own
    layers = blocks[1:]
    assert len(layers) >= 2
    for i, b in enumerate(layers):  # in graph order, each holding only its own block's layers
        assert all(f"/layers.{i}/" in n for n in b), b


def test_int8_fallback_keeps_the_last_blocks_float(tiny_bundle, vision_calibration):
    """Beyond reach (tolerance 1e-9): half the blocks, the last ones, go back to float and the output
    error falls; with tolerance 0 every linear layer is quantized and nothing is recorded."""
    import onnx

    from engines.int8 import linear_blocks, linear_layers

    plain = _quantize_vision(tiny_bundle, vision_calibration, 0.0)
    assert "float_fallback" not in plain.notes
    strict = _quantize_vision(tiny_bundle, vision_calibration, 1e-9)
    fb = strict.notes["float_fallback"]
    assert fb["met"] is False and fb["error"] < fb["error_all_int8"]
    model = onnx.load(str(tiny_bundle / "vision.onnx"))
    blocks = linear_blocks(model, [la.node for la in linear_layers(model)])  # constant weights only
    half = len(blocks) // 2
    assert fb["blocks"] == len(blocks) and len(fb["float_blocks"]) == half
    assert [f"{k}/" for k in fb["float_blocks"]] == [b[0][:len(k) + 1] for k, b in zip(fb["float_blocks"],
                                                                                    blocks[-half:])]
    assert strict.notes["linear_layers_quantized"] < plain.notes["linear_layers_quantized"]
    assert strict.notes["quantize_linear_nodes"] < plain.notes["quantize_linear_nodes"]
    assert set(strict.notes["kept_float32"]["nodes"]) >= set(sum(blocks[-half:], []))
    # within reach: nothing goes back to float
    loose = _quantize_vision(tiny_bundle, vision_calibration, 0.9).notes["float_fallback"]
    assert loose["met"] is True and loose["float_blocks"] == []
    assert loose["error"] == loose["error_all_int8"] == fb["error_all_int8"]
