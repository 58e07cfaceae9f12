"""The ORT engine build of the decoder: fused GroupQueryAttention with a KV cache updated in place."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest

from engines.ort_optimize import (
    KV_SHARED,
    PatternError,
    add_ort_engines,
    attach_ort_engine,
    fuse_decoder_attention,
)
from runtime.contract import GraphName
from runtime.decoder_only import DecoderOnlyModel
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime

PROMPTS = [[7, 8, 9, 10, 11], [12], []]  # three rows of different lengths


def _runtime(bundle, engines: bool) -> Blip2Runtime:
    return Blip2Runtime(bundle, engines=engines, threads=1)


def _prefix(rt, rows: int) -> np.ndarray:
    m = rt.manifest.model
    return np.random.default_rng(0).normal(size=(rows, m.num_query_tokens, m.llm_hidden)).astype(np.float32)


def test_export_writes_an_engine_with_fused_attention(tiny_bundle):
    m = load_manifest(tiny_bundle)
    rec = m.graph(GraphName.DECODER)
    info = rec.notes["ort_engine"]
    assert info["kv_cache"] == KV_SHARED and info["layers_fused"] == m.model.llm_layers
    assert info["qkv_packed"] == m.model.llm_layers  # one q|k|v matmul per layer feeding packed attention
    assert info["logits"] == "last"  # the LM head runs on one position per row
    assert [e.file for e in rec.engines if e.backend == "ort"] == [info["file"]]
    g = onnx.load(str(tiny_bundle / info["file"])).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GroupQueryAttention") == m.model.llm_layers
    assert "Softmax" not in ops and "Concat" not in [n.op_type for n in g.node if n.output[0].startswith("present")]
    for n in g.node:  # the cache is read by the fused attention only
        if any(x.startswith("past.") for x in n.input):
            assert n.op_type == "GroupQueryAttention"
    assert [i.name for i in g.input] == [t.name for t in rec.io.inputs]  # the contract's names are kept


def test_backend_loads_the_engine_only_when_asked(tiny_bundle):
    on, off = _runtime(tiny_bundle, True).graph(GraphName.DECODER), _runtime(tiny_bundle, False).graph(GraphName.DECODER)
    assert (on.facts.kv_cache, off.facts.kv_cache) == (KV_SHARED, "concat")
    assert on.facts.engine == "decoder.ort.onnx" and off.facts.engine is None


def _teacher_forced(rt, steps: int, max_new_tokens, select_at: int | None = None):
    """Logits of prefill + ``steps`` fixed tokens (and one beam-style row reorder at ``select_at``)."""
    sm = DecoderOnlyModel(rt.manifest, rt.graph(GraphName.DECODER), rt.embed, _prefix(rt, len(PROMPTS)), PROMPTS,
                          max_new_tokens=max_new_tokens)
    logits, state = sm.prefill()
    out = [logits]
    rows = len(PROMPTS)
    for k in range(steps):
        if select_at == k:
            order = np.array([2, 0, 0])
            state = sm.select(state, order)
        logits, state = sm.step(np.full(rows, 10 + k % 20, dtype=np.int64), state)
        out.append(logits)
    return np.stack(out)


def test_engine_logits_match_the_portable_graph(tiny_bundle):
    ref = _teacher_forced(_runtime(tiny_bundle, False), 6, 6)
    got = _teacher_forced(_runtime(tiny_bundle, True), 6, 6)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_in_place_cache_grows_and_reorders_rows(tiny_bundle):
    """Without max_new_tokens the cache starts small and must grow; select gathers rows like beam search."""
    steps = 80  # more than the first capacity (prompt + 64, rounded)
    ref = _teacher_forced(_runtime(tiny_bundle, False), steps, None, select_at=3)
    rt = _runtime(tiny_bundle, True)
    got = _teacher_forced(rt, steps, None, select_at=3)
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


def test_steps_write_logits_into_one_bound_buffer(tiny_bundle):
    """Steps reuse one logits buffer per binding (nothing fetched or allocated by ORT per token); each
    step still returns its own array, and a new binding (select, cache growth) gets a new buffer."""
    rt = _runtime(tiny_bundle, True)
    sm = DecoderOnlyModel(rt.manifest, rt.graph(GraphName.DECODER), rt.embed, _prefix(rt, 3), PROMPTS,
                          max_new_tokens=4)
    _, state = sm.prefill()
    assert state.logits is None
    toks = np.array([10, 11, 12])
    first, state = sm.step(toks, state)
    buf = state.logits
    assert buf is not None and buf.shape == (3, 1, rt.manifest.model.vocab_size)
    assert not state.binding._fetch  # logits bound to the buffer: the run hands nothing back
    second, state = sm.step(toks, state)
    assert state.logits is buf and not np.shares_memory(first, buf) and not np.shares_memory(second, buf)
    np.testing.assert_array_equal(second, buf[:, 0])
    assert not np.array_equal(first, second)  # the first step's logits were not overwritten
    state = sm.select(state, np.array([1, 0]))
    third, state = sm.step(toks[:2], state)
    assert state.logits is not buf and state.logits.shape[0] == 2 and third.shape == (2, buf.shape[2])


def test_generate_is_identical_with_and_without_the_engine(tiny_bundle):
    imgs = [np.random.default_rng(i).integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for i in range(3)]
    prompts = ["", "a photo of", "question : what is in the picture ? answer :"]
    for beams in (1, 2):
        a = _runtime(tiny_bundle, True).generate(imgs, prompts, max_new_tokens=12, num_beams=beams)
        b = _runtime(tiny_bundle, False).generate(imgs, prompts, max_new_tokens=12, num_beams=beams)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_binding_writes_outputs_into_caller_buffers(tiny_bundle):
    dec = _runtime(tiny_bundle, True).graph(GraphName.DECODER)
    m = load_manifest(tiny_bundle).model
    buf = {f"past.{i}.{k}": np.zeros((1, m.llm_heads, 8, m.head_dim), np.float32)
           for i in range(m.llm_layers) for k in ("key", "value")}
    b = dec.binding()
    b.output("logits")
    for name, arr in buf.items():
        b.input(name, arr)
        b.output(name.replace("past", "present"), arr)
    b.input("inputs_embeds", np.ones((1, 3, m.llm_hidden), np.float32))
    b.input("attention_mask", np.ones((1, 3), np.int64))
    b.input("position_ids", np.arange(3)[None])
    calls = dec.calls
    out = b.run()
    assert set(out) == {"logits"} and out["logits"].shape == (1, 1, m.vocab_size)  # newest position only
    assert dec.calls == calls + 1
    assert np.abs(buf["past.0.key"][0, :, :3]).sum() > 0 and not buf["past.0.key"][0, :, 3:].any()
    with pytest.raises(Exception, match="C-contiguous"):
        b.output("present.0.key", buf["past.0.key"][:, :, ::2])


def test_graph_without_the_pattern_is_left_alone(tiny_bundle, tmp_path):
    model = onnx.load(str(tiny_bundle / "vision.onnx"))
    with pytest.raises(PatternError):
        fuse_decoder_attention(model, layers=1, heads=2, head_dim=16)
    m = load_manifest(tiny_bundle)
    shutil.copy(tiny_bundle / "vision.onnx", tmp_path / "vision.onnx")
    rec = m.graph(GraphName.VISION)
    warnings = []
    assert attach_ort_engine(tmp_path, rec, m.model, warn=warnings.append) is rec  # fp32 vision: no engine kind
    assert warnings == []
    as_decoder = dataclasses.replace(m.graph(GraphName.DECODER), file="vision.onnx")
    assert attach_ort_engine(tmp_path, as_decoder, m.model, warn=warnings.append) is as_decoder
    assert warnings and "no ORT engine" in warnings[0]
    assert not list(tmp_path.glob("*.ort.onnx"))
    with pytest.raises(PatternError, match="multiple of 8"):
        fuse_decoder_attention(onnx.load(str(tiny_bundle / "decoder.onnx")), layers=2, heads=4, head_dim=12)


def test_add_engines_to_an_existing_bundle(bundle_copy):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    dec = raw["graphs"]["fp32"]["decoder"]
    dec["engines"], dec["notes"] = [], {}
    (bundle_copy / "decoder.ort.onnx").unlink()
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    assert _runtime(bundle_copy, True).graph(GraphName.DECODER).facts.kv_cache == "concat"
    assert add_ort_engines(bundle_copy) == ["fp32"]
    assert add_ort_engines(bundle_copy) == []  # already there
    load_manifest(bundle_copy, verify=True)  # checksums of the new engine are recorded
    assert _runtime(bundle_copy, True).graph(GraphName.DECODER).facts.kv_cache == KV_SHARED


@pytest.mark.parametrize("mode", ["fold", "nbits"])
def test_weight_only_int8_engine(tiny_bundle, tmp_path, mode):
    """nbits (default): one MatMulNBits per layer reads the int8 bytes (activations quantized at run time);
    the engine keeps the portable int8 weights (stored once) and the runtime lowers them as it loads.
    fold: DequantizeLinear of int8 weights computed once, same values as the int8 graph."""
    import onnxruntime as ort

    from engines.int8 import quantize_weights
    from engines.onnx_utils import save_model_atomic
    from engines.ort_optimize import build_decoder_engine

    m = load_manifest(tiny_bundle)
    rec = m.graph(GraphName.DECODER)
    q = quantize_weights(tiny_bundle / rec.file, "decoder", rec.io)
    dq = sum(n.op_type == "DequantizeLinear" for n in q.model.graph.node)
    assert dq > 0
    save_model_atomic(q.model, tmp_path / "decoder.int8.onnx")
    _, notes = build_decoder_engine(tmp_path / "decoder.int8.onnx", tmp_path / "engine.onnx", int8=mode,
                                    layers=m.model.llm_layers, heads=m.model.llm_heads, head_dim=m.model.head_dim)
    engine_model = onnx.load(str(tmp_path / "engine.onnx"))
    if mode == "nbits":  # the portable form, q|k|v packed: what the runtime lowers as it loads the engine
        assert notes["lower_at_load"] and notes["qkv_packed"] == m.model.llm_layers
        assert [n.op_type for n in engine_model.graph.node].count("DequantizeLinear") == dq - 2 * notes["qkv_packed"]
        from onnx import numpy_helper

        from runtime.backends.nbits import lower_layers

        inits = {t.name: t for t in engine_model.graph.initializer}
        lower_layers(engine_model, lambda n: numpy_helper.to_array(inits[n]) if n in inits else None,
                          lambda a, n: numpy_helper.from_array(a, n))
        onnx.save(engine_model, str(tmp_path / "engine.onnx"))
    ops = [n.op_type for n in engine_model.graph.node]
    assert "DequantizeLinear" not in ops
    if mode == "nbits":
        # q, k and v of each layer end up in one packed MatMulNBits
        assert notes["int8_matmul"]["layers"] == dq and ops.count("MatMulNBits") == dq - 2 * notes["qkv_packed"]
    else:
        assert notes["int8_weights_folded"] == dq and "MatMulNBits" not in ops

    f = m.model
    x = np.random.default_rng(0).normal(size=(1, 6, f.llm_hidden)).astype(np.float32)
    base = {"inputs_embeds": x, "attention_mask": np.ones((1, 6), np.int64), "position_ids": np.arange(6)[None]}
    so = ort.SessionOptions()  # the graph's own arithmetic (ORT's optimizer would fuse some DQ+MatMul itself)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(tmp_path / "decoder.int8.onnx"), so, providers=["CPUExecutionProvider"])
    empty = np.zeros((1, f.llm_heads, 0, f.head_dim), np.float32)
    ref = plain.run(["logits"], {**base, **{t.name: empty for t in rec.io.inputs[3:]}})[0][:, -1:]
    engine = ort.InferenceSession(str(tmp_path / "engine.onnx"), providers=["CPUExecutionProvider"])
    cache = {t.name: np.zeros((1, f.llm_heads, 8, f.head_dim), np.float32) for t in rec.io.inputs[3:]}
    got = engine.run(["logits"], {**base, **cache})[0]  # the engine computes the newest position only
    assert got.shape == ref.shape
    if mode == "fold":
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    else:
        cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos > 0.999
        # the token it picks is one the int8 graph scores within a small margin of its best
        r = ref.reshape(-1)
        assert r.max() - r[got.argmax()] < 0.02 * (r.max() - r.min()), (r.max(), r[got.argmax()])


def test_uint8_activations_keep_the_values_and_pick_the_fast_kernel():
    """Symmetric int8 activation Q/DQ pairs become uint8 (zero point 128): the same integers shifted."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engines.int8 import quantize_per_channel
    from engines.ort_optimize import uint8_activations

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32)
    wq, ws = quantize_per_channel(w, 1)
    x_scale = np.float32(3.0 / 127)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(48, np.int8), "wz"), numpy_helper.from_array(x_scale, "xs"),
             numpy_helper.from_array(np.int8(0), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])], inits,
                              value_info=[helper.make_tensor_value_info("xq", TensorProto.INT8, [None, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = model.SerializeToString()
    assert uint8_activations(model) == 1
    zps = {n.name: numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[2]))
           for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert zps["q"].dtype == np.uint8 and zps["q"] == 128 and zps["dqx"] == 128
    assert zps["dqw"].dtype == np.int8  # weights stay symmetric int8
    x = (rng.normal(size=(5, 64)) * 2).astype(np.float32)
    x[0, 0] = 10.0  # saturates: int8 clamps at -128/127, uint8 at 0/255, the same integer after the shift
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
           for m in (before, model.SerializeToString())]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)
    assert uint8_activations(model) == 0  # already uint8: nothing left to rewrite
