"""The calibrated (static) int8 recipe made here, weights streamed (#13): what it quantizes, how it picks
activation ranges, that it never loads a graph's weights whole, and that an int8 build calibrates its
LLM side through the int8 decoder it has just made rather than the fp32 one."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from bundle_tools import write_calibration_images

from engines.build import BuildConfig, _llm_side, build_bundle
from engines.calibration import LlmSide, collect, list_calibration_images
from engines.ranges import RangeObserver, entropy_threshold, percentile_threshold
from runtime.contract import GraphName
from runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calibration_images(tmp_path_factory.mktemp("static-calib"), n=4)


@pytest.fixture(scope="module")
def vision_feeds(tiny_bundle, calib):
    return collect(tiny_bundle, list_calibration_images(calib), ("",), llm=LlmSide(run=False)).feeds["vision"]


def _quantize(tiny_bundle, feeds, method="minmax", **kw):
    from engines.int8 import CalibMethod, quantize_static_graph

    io = load_manifest(tiny_bundle).graph("vision", "fp32").io
    return quantize_static_graph(tiny_bundle / "vision.onnx", "vision", io, feeds, CalibMethod(method), **kw)


# -- ranges ------------------------------------------------------------------------------------------
def _observe(method: str, arrays: list[np.ndarray], **kw) -> float:
    obs = RangeObserver(method, **kw)
    for _ in range(obs.passes):
        for a in arrays:
            obs.observe({"x": a})
        obs.next_pass()
    return obs.amax("x")


def test_ranges_minmax_percentile_entropy():
    rng = np.random.default_rng(0)
    # different shapes mix (a decoder's prefill and its steps): only per-bin counts are kept
    arrays = [rng.standard_normal((2, 5000)).astype(np.float32), rng.standard_normal((1, 7, 300)).astype(np.float32)]
    arrays[1][0, 0, 0] = -50.0  # one outlier
    assert _observe("minmax", arrays) == 50.0
    p = _observe("percentile", arrays, percentile=99.9)
    exact = np.percentile(np.abs(np.concatenate([a.ravel() for a in arrays])), 99.9)
    assert abs(p - exact) <= 50.0 / 2048 * 2  # within two bins of the exact percentile; the outlier clips
    e = _observe("entropy", arrays)
    assert 1.5 < e < 50.0
    assert _observe("percentile", [np.zeros((3, 3), np.float32)]) == 0.0  # all zeros: no range (scale 1)


def test_histogram_thresholds():
    h = np.zeros(2048, np.int64)
    h[:100] = 10
    h[2000] = 1  # one far value
    assert percentile_threshold(h, 100.0) == 2001
    assert percentile_threshold(h, 99.0) <= 100
    # entropy: a bell of |N(0, 1)| with one value at 50 clips far below 50 (and far above the bell's body)
    x = np.abs(np.random.default_rng(1).standard_normal(1_000_000))
    x[0] = 50.0
    bell = np.bincount(np.minimum((x * 2048 / 50).astype(int), 2047), minlength=2048)
    assert 2.0 < entropy_threshold(bell) * 50 / 2048 < 10.0


# -- the graph it writes -------------------------------------------------------------------------------
def test_static_int8_quantizes_the_inputs_of_linear_layers_only(tiny_bundle, vision_feeds):
    """Q/DQ on each linear layer's activation input and its weight (per output channel), an int32 bias on
    the Conv; attention products, Softmax, LayerNorm and the layers' outputs stay float."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from engines.int8 import linear_layers

    r = _quantize(tiny_bundle, vision_feeds)
    m = r.model
    fp32 = onnx.load(str(tiny_bundle / "vision.onnx"), load_external_data=False)
    layers = linear_layers(fp32)
    assert r.notes["linear_layers_quantized"] == len(layers) == 9  # 4 per block x 2 + the patch Conv
    nodes = {n.name: n for n in m.graph.node}
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    for la in layers:
        n = nodes[la.node]
        dq_x, dq_w = prod[n.input[0]], prod[n.input[1]]
        assert dq_x.op_type == "DequantizeLinear" and prod[dq_x.input[0]].op_type == "QuantizeLinear"
        assert prod[dq_x.input[0]].input[0] == la.x
        w = inits[dq_w.input[0]]
        assert dq_w.op_type == "DequantizeLinear" and w.data_type == TensorProto.INT8
        scale = numpy_helper.to_array(inits[dq_w.input[1]])
        assert scale.shape == (w.dims[la.axis],)  # one scale per output channel
        if la.op == "Conv":
            b = prod[n.input[2]]
            assert b.op_type == "DequantizeLinear" and inits[b.input[0]].data_type == TensorProto.INT32
    quantized_inputs = {q.input[0] for q in m.graph.node if q.op_type == "QuantizeLinear"}
    assert quantized_inputs == {la.x for la in layers}  # nothing else: no outputs, no Softmax
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.name not in {la.node for la in layers}:  # Q.K^T and P.V
            assert all(prod.get(x) is None or prod[x].op_type != "DequantizeLinear" for x in n.input), n.name
    onnx.checker.check_model(m)


def test_static_int8_is_close_to_fp32(tiny_bundle, vision_feeds, tmp_path):
    from engines.int8 import graph_outputs, output_error
    from engines.onnx_utils import save_model_atomic

    io = load_manifest(tiny_bundle).graph("vision", "fp32").io
    save_model_atomic(_quantize(tiny_bundle, vision_feeds, "percentile").model, tmp_path / "v8.onnx")
    ref = graph_outputs(tiny_bundle / "vision.onnx", vision_feeds, io)
    got = graph_outputs(tmp_path / "v8.onnx", vision_feeds, io)
    err = output_error(ref, got)
    assert 0 < err < 0.1, err


def test_static_int8_never_loads_the_weights_whole(tiny_bundle, vision_feeds, monkeypatch):
    """The graph is read without its external data, weights one at a time; ONNX Runtime's own
    quantizer (used before) loaded and copied the whole fp32 graph, several times over."""
    import onnx

    real = onnx.load_model
    loaded = []

    def spy(f, *a, **kw):
        if kw.get("load_external_data", True):
            loaded.append(str(f))
        return real(f, *a, **kw)

    monkeypatch.setattr(onnx, "load_model", spy)
    monkeypatch.setattr(onnx, "load", spy)
    r = _quantize(tiny_bundle, vision_feeds, "percentile", tolerance=1e-9)  # the fallback's steps too
    assert loaded == []
    assert r.notes["float_fallback"]["float_blocks"]  # (the fallback ran)
    assert not list(tiny_bundle.glob(".int8-*"))  # its work folder is gone


# -- calibration through the built decoder -----------------------------------------------------------
@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, calib, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("static-int8") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    build_bundle(bundle, BuildConfig(precision="int8", backend="ort", calib_images=calib), progress=False)
    return bundle


def test_llm_side_of_each_build(int8_bundle):
    m = load_manifest(int8_bundle)
    recs = m.graphs["int8"]

    def side(**kw):
        cfg = BuildConfig(precision=kw.pop("precision", "int8"), backend="ort", **kw)
        return _llm_side(list(m.graphs["fp32"]), cfg.plan(m), cfg, int8_bundle, recs)

    built = side()  # weight-only LLM: calibrated through the int8 decoder, for the KV cache's scales
    assert built.run and list(built.graphs) == ["decoder"] and built.graphs["decoder"][1] is recs["decoder"]
    assert side(llm_int8="static") == LlmSide()  # a calibrated LLM: its ranges come from the fp32 one
    gptq = side(precision="int4")  # statistics for GPTQ: from the weight-only int8 build the build makes
    assert list(gptq.graphs) == ["decoder"] and gptq.graphs["decoder"][1].transform == "int8-weight"
    assert side(ort_kv_cache="fp32").run is False  # nothing on the LLM side needs calibration


def test_calibration_runs_the_built_decoder_lowered(int8_bundle, calib, monkeypatch):
    """The LLM side runs the int8 decoder (portable graph, as a build has it before its engine exists)
    with its int8 layers as MatMulNBits; its KV-cache peaks are close to the fp32 decoder's, not equal."""
    import runtime.backends.ort as ort_backend

    m = load_manifest(int8_bundle)
    dec = m.graph("decoder", "int8")
    portable = dataclasses.replace(dec, engines=(), notes={k: v for k, v in dec.notes.items() if k != "ort_engine"})
    lowered = []
    real = ort_backend._lowered_model
    monkeypatch.setattr(ort_backend, "_lowered_model", lambda model, *a: lowered.append(1) or real(model, *a))
    images = list_calibration_images(calib)[:2]
    via_int8 = collect(int8_bundle, images, ("",), decode_steps=2,
                       llm=LlmSide(graphs={GraphName.DECODER.value: (int8_bundle, portable)}))
    assert lowered == [1]  # the decoder, lowered at load; the fp32 image side has nothing to lower
    via_fp32 = collect(int8_bundle, images, ("",), decode_steps=2)
    assert lowered == [1]
    assert via_int8.count("decoder") == via_fp32.count("decoder") > 0
    assert sorted(via_int8.kv_peak) == sorted(via_fp32.kv_peak) and len(via_int8.kv_peak) == 2 * m.model.llm_layers
    for k, peak in via_fp32.kv_peak.items():
        np.testing.assert_allclose(via_int8.kv_peak[k], peak, rtol=0.2, atol=0.05 * float(peak.max()))
    assert any(not np.array_equal(via_int8.kv_peak[k], p) for k, p in via_fp32.kv_peak.items())
    # and the build's engine holds an int8 cache with those scales
    assert m.graph("decoder", "int8").notes["ort_engine"]["kv_dtype"] == "int8"


def test_int4_gptq_statistics_come_from_a_weight_only_int8_decoder(int8_bundle, calib, tmp_path, monkeypatch):
    """An int4 (GPTQ) build calibrates through a weight-only int8 build of the decoder and takes GPTQ's
    layer inputs from it, lowered to MatMulNBits, never running the fp32 decoder; that helper graph is
    not part of the bundle afterwards."""
    import engines.build as eb
    import engines.int4 as i4

    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle)
    seen = {}
    real_collect, real_int4, real_lower = eb.collect, eb.quantize_int4, i4._lower_into
    monkeypatch.setattr(eb, "collect", lambda *a, **kw: seen.setdefault("llm", kw["llm"]) and real_collect(*a, **kw))
    monkeypatch.setattr(eb, "quantize_int4",
                        lambda *a, **kw: seen.setdefault("stats", kw["stats_graph"]) and real_int4(*a, **kw))
    monkeypatch.setattr(i4, "_lower_into", lambda m, f: seen.setdefault("lowered", True) and real_lower(m, f))
    build_bundle(bundle, BuildConfig(precision="int4", backend="ort", calib_images=calib), progress=False)
    llm = seen["llm"]
    assert list(llm.graphs) == ["decoder"] and llm.graphs["decoder"][1].transform == "int8-weight"
    assert seen["stats"].name == llm.graphs["decoder"][1].file and seen["lowered"] is True
    assert not list(bundle.glob(".stats*")) and not list(bundle.glob(".build*"))
    m = load_manifest(bundle, verify=True)
    dec = m.graph("decoder", "int4")
    assert dec.transform == "int4-gptq" and dec.notes["calibration"]["output_error_vs_rtn"] < 1.0
