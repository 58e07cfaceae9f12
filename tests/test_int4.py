"""int4 weight-only LLM (engines/int4.py) and the precision registry (runtime/precisions.py) that every
precision-spelling part reads: built, run and checked for parity through ONNX Runtime on CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from bundle_tools import write_calibration_images

from blip2_export.parity import THRESHOLDS, list_images, run_parity
from engines.build import BACKEND_PRECISIONS, TRANSFORM_FUNCS, BuildConfig, build_bundle
from runtime.contract import GraphName
from runtime.errors import Blip2Error, BundleError
from runtime.manifest import Manifest, iter_files, load_manifest
from runtime.pipeline import Blip2Runtime
from runtime.precisions import PRECISIONS, TRANSFORMS, Role

PROMPTS = ("", "Question: what is in the picture? Answer:")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the registry ----------------------------------------------------------------------------------------
def test_every_registered_transform_has_a_function_and_every_precision_a_transform_per_role():
    for spec in PRECISIONS.values():
        for role in Role:
            for t in spec.transform_names(role):
                assert t in TRANSFORMS
                assert t == "none" or t in TRANSFORM_FUNCS, f"{spec.name}: no function performs {t}"
    assert BACKEND_PRECISIONS["ort"] == ("fp16", "int8", "int4")
    assert THRESHOLDS["int4"] is PRECISIONS["int4"].parity


def test_cli_choices_and_help_come_from_the_registry():
    from click.testing import CliRunner

    from blip2_export.cli import cli

    for cmd in ("build", "run", "evaluate", "parity", "retrieve"):
        params = {p.name: p for p in cli.commands[cmd].params}
        key = "precisions" if cmd == "evaluate" else "precision"
        assert list(params[key].type.choices) == list(PRECISIONS), cmd
    out = CliRunner().invoke(cli, ["build", "--help"]).output
    for spec in PRECISIONS.values():
        assert f"{spec.name}:" in out
    assert "--int4-block" in out and "--int4-method" in out


def test_manifest_refuses_a_transform_its_precision_does_not_have(tiny_bundle):
    d = json.loads((tiny_bundle / "manifest.json").read_text())
    d["graphs"]["fp32"]["decoder"]["transform"] = "int4-gptq"
    with pytest.raises(BundleError, match="int4-gptq"):
        Manifest.from_json(d)
    d["graphs"]["fp32"]["decoder"]["transform"] = ""
    d["graphs"]["int5"] = {}
    with pytest.raises(BundleError, match="unknown precision 'int5'"):
        Manifest.from_json(d)


def test_ort_engine_kind_comes_from_the_typed_transform_not_the_notes(tiny_bundle):
    import dataclasses

    from engines.ort_optimize import wants_engine

    rec = load_manifest(tiny_bundle).graph("vision", "fp32")
    assert rec.transform_spec.name == "none" and wants_engine(rec) is None
    # notes that say "static int8" do not make an engine; the typed transform does
    noted = dataclasses.replace(rec, notes={"transform": "int8", "recipe": "static"}, transform="none")
    assert wants_engine(noted) is None
    assert wants_engine(dataclasses.replace(rec, transform="int8-static")) == "qdq"
    enc = dataclasses.replace(rec, name="encoder", transform="int4-gptq")
    assert wants_engine(enc) == "weights"


def test_build_config_picks_transforms_from_the_registry_and_needs_calibration_only_where_it_does(tmp_path):
    cfg = BuildConfig(precision="int4", backend="ort")
    assert {n: t.name for n, t in cfg.plan().items()} == {"vision": "int8-static", "qformer": "int8-static",
                                                          "decoder": "int4-gptq"}
    with pytest.raises(Blip2Error, match="calibration images"):
        cfg.validate()
    plain = BuildConfig(precision="int4", backend="ort", int4_method="rtn", int4_vision="fp16")
    assert {t.name for t in plain.plan().values()} == {"fp16", "int4-rtn"}
    plain.validate()  # nothing calibrated: no images needed
    with pytest.raises(Blip2Error, match="--int4-block"):
        BuildConfig(precision="int4", backend="ort", int4_block=100).validate()
    with pytest.raises(Blip2Error, match="--int4-vision"):
        BuildConfig(precision="int4", backend="ort", int4_vision="int2").plan()


# -- the numbers -----------------------------------------------------------------------------------------
def test_int4_packing_round_trips():
    from runtime.backends.nbits import pack_int4, unpack_int4

    v = np.arange(-8, 8, dtype=np.int8).repeat(3)[:47]
    assert np.array_equal(unpack_int4(pack_int4(v), v.size), v)


def test_gptq_beats_plain_rounding_on_correlated_inputs():
    """On inputs with correlated channels (as real activations are), error feedback lowers the layer's
    output error well below plain rounding's at the same format."""
    from engines.int4 import dequantize, quantize_gptq, quantize_rtn

    rng = np.random.default_rng(0)
    k, n = 256, 64
    mix = rng.normal(size=(k, k)) * (rng.random(k) ** 3)[None, :]
    x = rng.normal(size=(2048, k)) @ mix.T
    w = rng.normal(size=(n, k)).astype(np.float32)
    h = x.T @ x
    err = {}
    for name, (q, s) in {"rtn": quantize_rtn(w, 64), "gptq": quantize_gptq(w, h, 64)}.items():
        assert q.min() >= -8 and q.max() <= 7 and s.shape == (n, k // 64)
        err[name] = float(np.linalg.norm(x @ (w - dequantize(q, s, 64)).T))
    assert err["gptq"] < 0.8 * err["rtn"], err


# -- built bundles -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory):
    """The tiny OPT bundle with int8 and int4 (GPTQ, block 32) graphs."""
    root = tmp_path_factory.mktemp("int4")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    calib = write_calibration_images(root / "calib")
    reports = {p: build_bundle(bundle, BuildConfig(precision=p, backend="ort", calib_images=calib, int4_block=32),
                               progress=False) for p in ("int8", "int4")}
    return bundle, reports, calib


def _ops(path) -> list:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def _loaded_decoder_ops(bundle, precision, monkeypatch, tmp_path, graph=GraphName.DECODER) -> list:
    """The nodes of the decoder as ONNX Runtime runs it once the runtime has loaded it (ORT's optimized
    graph, written by the very session the runtime creates)."""
    import onnx

    from runtime.backends.ort import OrtBackend

    out = tmp_path / f"optimized-{precision}-{graph.value}.onnx"
    real = OrtBackend.session_options

    def with_dump(self):
        so = real(self)
        so.optimized_model_filepath = str(out)
        return so

    monkeypatch.setattr(OrtBackend, "session_options", with_dump)
    Blip2Runtime(bundle, precision=precision, threads=1).graph(graph)
    monkeypatch.undo()
    return list(onnx.load(str(out), load_external_data=False).graph.node)


def test_int4_manifest_graphs_and_engine(built, tmp_path, monkeypatch):
    bundle, _, _ = built
    m = load_manifest(bundle)
    assert m.precisions() == ["fp32", "int8", "int4"]
    dec = m.graph("decoder", "int4")
    assert dec.transform == "int4-gptq" and m.graph("vision", "int4").transform == "int8-static"
    assert dec.notes["block_size"] == 32 and dec.notes["lm_head"] == "int4"
    assert dec.notes["linear_layers"]["int4"] > 0 and dec.notes["linear_layers"]["fp32"] == 0
    assert dec.notes["calibration"]["output_error_vs_rtn"] < 1.0  # GPTQ beat rounding on its calibration data
    # portable graph: int4 initializers behind blockwise DequantizeLinear (what TensorRT builds)
    import onnx

    model = onnx.load(str(bundle / dec.file))
    assert any(o.domain in ("", "ai.onnx") and o.version >= 21 for o in model.opset_import)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in dqs)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len(dqs)
    # ORT engine: the int4 layers stay DequantizeLinear -> MatMul on the portable graph's own weights
    # (stored once: the engine's int4 tensors are the portable graph's, same file and offsets) ...
    engine_file = dec.notes["ort_engine"]["file"]
    eng = onnx.load(str(bundle / engine_file), load_external_data=False)

    def int4_refs(g):  # where each int4 weight is: its inline bytes, or its place in an external file
        return {t.name: (t.raw_data, tuple((e.key, e.value) for e in t.external_data)) for t in g.graph.initializer
                if t.data_type == onnx.TensorProto.INT4}

    portable = onnx.load(str(bundle / dec.file), load_external_data=False)
    assert int4_refs(eng) and int4_refs(eng) == int4_refs(portable)
    assert dec.notes["ort_engine"]["int4_matmul"]["layers"] == dec.notes["linear_layers"]["int4"]
    # ... which ONNX Runtime, as the runtime loads it, fuses into MatMulNBits bits=4: none left
    opt = _loaded_decoder_ops(bundle, "int4", monkeypatch, tmp_path)
    nbits = [n for n in opt if n.op_type == "MatMulNBits"]
    assert len(nbits) == dec.notes["linear_layers"]["int4"]
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 and
               {a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert not any(n.op_type == "DequantizeLinear" for n in opt)


def test_int4_linear_weights_are_about_half_of_int8s(built):
    """Bytes of the LLM's linear layers (the weights each decode step reads) in the ORT engines."""
    import onnx
    from onnx import numpy_helper

    bundle, _, _ = built
    m = load_manifest(bundle)

    def linear_bytes(prec):  # MatMulNBits weights (int8), DequantizeLinear weights + scales (int4: ORT fuses them)
        model = onnx.load(str(bundle / m.graph("decoder", prec).notes["ort_engine"]["file"]))
        inits = {t.name: t for t in model.graph.initializer}
        ops = ("MatMulNBits", "DequantizeLinear")
        return sum(len(inits[i].raw_data) or numpy_helper.to_array(inits[i]).nbytes for n in model.graph.node
                   if n.op_type in ops for i in n.input[1 if n.op_type == "MatMulNBits" else 0:] if i in inits)

    ratio = linear_bytes("int4") / linear_bytes("int8")
    assert 0.45 < ratio < 0.66, ratio  # block 32: 4 + 1 bits per weight vs 8 + 0.3 (fp32 scales)
    # what bench reports as the weight bytes a decode step reads counts int4 at two codes per byte
    from blip2_export.bench import onnx_weight_bytes

    step = {p: onnx_weight_bytes(bundle / m.graph("decoder", p).notes["ort_engine"]["file"]) for p in ("int8", "int4")}
    assert step["int4"] < 0.75 * step["int8"], step


def test_int4_engine_computes_what_the_portable_graph_computes(built):
    bundle, _, _ = built
    fast, plain = (Blip2Runtime(bundle, precision="int4", engines=e, threads=1) for e in (True, False))
    assert fast.graph(GraphName.DECODER).facts.engine == "decoder.int4.ort.onnx"
    assert plain.graph(GraphName.DECODER).facts.engine is None
    imgs = list_images(None, count=2)
    a = fast.generate(imgs, "", max_new_tokens=8)
    b = plain.generate(imgs, "", max_new_tokens=8)
    same = sum(x == y for ga, gb in zip(a, b) for x, y in zip(ga.token_ids, gb.token_ids))
    assert same >= 0.75 * sum(len(g.token_ids) for g in a)


def test_int4_parity_on_tiny_passes_its_registered_thresholds(built, tiny_checkpoint, tiny_model):
    bundle, _, _ = built
    rep = run_parity(tiny_checkpoint, bundle, images=list_images(None, count=3), prompts=PROMPTS,
                     precision="int4", model_and_tokenizer=tiny_model)
    assert rep.thresholds == PRECISIONS["int4"].parity
    assert rep.forced_top1 is not None and "teacher-forced top-1" in rep.render()
    assert rep.ok, rep.render()


def test_int4_lm_head_as_int8_is_an_8bit_matmul(built, tmp_path, monkeypatch):
    bundle, _, calib = built
    b2 = tmp_path / "b"
    shutil.copytree(bundle, b2)
    build_bundle(b2, BuildConfig(precision="int4", backend="ort", calib_images=calib, int4_lm_head="int8",
                                 int4_method="rtn", force=True), progress=False)
    dec = load_manifest(b2).graph("decoder", "int4")
    assert dec.notes["lm_head"] == "int8" and dec.transform == "int4-rtn" and "calibration" not in dec.notes
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits")
                  for n in _loaded_decoder_ops(b2, "int4", monkeypatch, tmp_path) if n.op_type == "MatMulNBits")
    assert bits[-1] == 8 and bits[0] == 4 and bits.count(8) == 1


def test_cli_build_and_run_int4(built, tmp_path):
    from blip2_export.cli import main

    bundle, _, _ = built
    b2 = tmp_path / "b"
    shutil.copytree(bundle, b2)
    assert main(["build", str(b2), "--precision", "int4", "--int4-method", "rtn", "--int4-vision", "fp16",
                 "--int4-block", "64", "--force"]) == 0
    m = load_manifest(b2)
    assert m.graph("vision", "int4").transform == "fp16" and m.graph("decoder", "int4").notes["block_size"] == 64
    assert m.graph("vision", "int4").io.inputs[0].dtype == "float32"  # the precision's IO, fp16 inside
    img = tmp_path / "x.png"
    list_images(None, count=1)[0].save(img)
    assert main(["run", str(b2), "--precision", "int4", "-i", str(img), "--max-new-tokens", "4"]) == 0


def test_t5_int4_graphs_run_as_matmulnbits(tmp_path_factory, tmp_path, monkeypatch):
    """T5: encoder, cross K/V and decoder get int4 (GPTQ from the calibration run, which now generates for
    encoder-decoder bundles too). Their ORT engines keep the portable int4 weights and the runtime makes
    each layer a 4-bit MatMulNBits as it loads them. The tiny random T5's logits are near ties, so token
    agreement says little here (its int8 build agrees on about half); the runtime with and without
    engines must agree closely, and the teacher-forced logits stay bounded."""
    from test_t5 import build_t5

    ck, bundle0, model = build_t5(tmp_path_factory, "tiny")
    root = tmp_path_factory.mktemp("t5-int4")
    bundle = root / "bundle"
    shutil.copytree(bundle0, bundle)
    build_bundle(bundle, BuildConfig(precision="int4", backend="ort", int4_block=32,
                                     calib_images=write_calibration_images(root / "calib")), progress=False)
    m = load_manifest(bundle)
    for g in (GraphName.ENCODER, GraphName.CROSS_KV, GraphName.SEQ2SEQ_DECODER):
        rec = m.graph(g, "int4")
        assert rec.transform == "int4-gptq" and rec.notes["calibration"]["samples"] > 0, g
        assert rec.notes["ort_engine"]["lower_at_load"], g
        ops = _loaded_decoder_ops(bundle, "int4", monkeypatch, tmp_path, graph=g)
        assert sum(n.op_type == "MatMulNBits" for n in ops) == rec.notes["linear_layers"]["int4"] > 0, g
        assert not any(n.op_type == "DequantizeLinear" for n in ops), g
    reps = [run_parity(ck, bundle, images=list_images(None, count=2), prompts=("",), precision="int4",
                       model_and_tokenizer=model, engines=e) for e in (True, False)]
    assert [g.runtime_ids for g in reps[0].generations] == [g.runtime_ids for g in reps[1].generations]
    assert all(s.ok for s in reps[0].stages) and not reps[0].nonfinite
    assert max(g.max_logits_diff for g in reps[0].generations) < 1.0, reps[0].render()


def test_bench_holds_int4_decode_and_weight_bytes_against_int8():
    from blip2_export.bench import evaluate_targets, parse_backend

    assert parse_backend("ort-int4") == ("ort", "int4")

    def report(int4_ms, int4_bytes):
        sweep = [{"batch": 1, "context": 64, "ms": {"p50": 2.0, "min": 2.0}, "roofline_ms": 1.0}]

        def backend(ms, nbytes):
            return {"status": "ok", "weight_bytes": nbytes, "decode_sweep": sweep,
                    "e2e": {"1": {"stages_ms": {"decode_per_token": {"p50": ms}, "e2e": {"p50": 10 * ms}}}}}

        rows = evaluate_targets({"ort-int4": backend(int4_ms, int4_bytes), "ort-int8": backend(10.0, 1000)})
        return {r.target.split(" <=")[0]: r for r in rows if "x ort-int8" in r.target}

    rows = report(5.0, 500)
    assert rows["ort-int4 decode step"].value == pytest.approx(0.5) and rows["ort-int4 decode step"].met
    assert rows["ort-int4 LLM weight bytes"].value == pytest.approx(0.5)
    rows = report(7.0, 600)
    assert not rows["ort-int4 decode step"].met and not rows["ort-int4 LLM weight bytes"].met


def test_input_hessians_are_held_a_group_at_a_time_within_the_budget(tmp_path):
    """A large LLM's X^T X matrices do not all fit in memory: a small budget computes them in several passes
    over the calibration feeds, with the same values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engines.int4 import InputHessians

    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(16, 32)).astype(np.float32), rng.normal(size=(32, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.normal(size=(5, 16)).astype(np.float32)} for _ in range(3)]
    inputs = [("x", 16), ("r", 32)]
    one, split = (InputHessians(tmp_path / "m.onnx", feeds, inputs, budget=b) for b in (1 << 20, 8 * 32 * 32))
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    assert np.allclose(one.get("x"), x.T @ x)
    for name in ("x", "r"):
        assert np.allclose(one.get(name), split.get(name))
    assert one.passes == 1 and split.passes == 2
    one.close()
    split.close()


def test_quantized_engines_keep_the_portable_weights(built, tmp_path, monkeypatch):
    """#13/#16: the int8 and int4 decoder engines read the portable graph's quantized weights (stored once);
    the only quantized tensors of their own are each layer's packed q|k|v (int8)."""
    import onnx

    bundle, _, _ = built
    m = load_manifest(bundle)
    quantized = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)

    def weights(path):
        g = onnx.load(str(path), load_external_data=False)
        return {t.name: (t.raw_data, tuple((e.key, e.value) for e in t.external_data)) for t in g.graph.initializer
                if t.data_type in quantized}

    for prec in ("int8", "int4"):
        dec = m.graph("decoder", prec)
        portable, engine = weights(bundle / dec.file), weights(bundle / dec.notes["ort_engine"]["file"])
        own = {n for n in engine if n not in portable}
        assert own == {n for n in engine if "/qkv/" in n}, (prec, sorted(own)[:5])
        assert all(engine[n] == portable[n] for n in engine if n not in own), prec
        assert len(engine) > len(own) > 0 or (prec == "int4" and not own), prec
    # int8: the runtime lowers them as it loads (one 8-bit MatMulNBits per layer, q|k|v as one)
    dec = m.graph("decoder", "int8")
    ops = _loaded_decoder_ops(bundle, "int8", monkeypatch, tmp_path)
    nbits = [{a.name: a.i for a in n.attribute} for n in ops if n.op_type == "MatMulNBits"]
    packed = dec.notes["ort_engine"]["qkv_packed"]
    assert len(nbits) == dec.notes["linear_layers_quantized"] - 2 * packed and packed == m.model.llm_layers
    assert all(a["bits"] == 8 and a["accuracy_level"] == 4 and a["block_size"] in (16, 128) for a in nbits)
    assert not any(n.op_type == "DequantizeLinear" for n in ops)


def test_int4_reads_a_float16_embedding_table_of_its_own(built, tmp_path, monkeypatch):
    """#16: int4 carries its prompt-embedding table in float16 (half the bytes on disk and in memory); the
    shared float32 table stays for the other precisions and int4 never opens it. A rebuild replaces it."""
    import os

    bundle, _, calib = built
    m = load_manifest(bundle)
    own = m.files["embed_tokens.int4"]
    fp32_table = np.load(bundle / m.files["embed_tokens"].file)
    table = np.load(bundle / own.file)
    assert table.dtype == np.float16 and table.shape == fp32_table.shape
    assert np.array_equal(table, fp32_table.astype(np.float16))
    assert "embed_tokens.int8" not in m.files  # int8 reads the shared table
    opened = []
    real_open = os.open

    def spy(path, *a, **k):
        opened.append(os.path.basename(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    rt = Blip2Runtime(bundle, precision="int4", threads=1)
    monkeypatch.undo()
    assert rt.embed.dtype == np.float16 and own.file in opened and m.files["embed_tokens"].file not in opened
    assert Blip2Runtime(bundle, precision="fp32", threads=1).embed.dtype == np.float32
    # a rebuild writes the other name and removes the previous table
    b2 = tmp_path / "b"
    shutil.copytree(bundle, b2)
    build_bundle(b2, BuildConfig(precision="int4", backend="ort", calib_images=calib, int4_method="rtn",
                                 force=True), progress=False)
    m2 = load_manifest(b2)
    assert m2.files["embed_tokens.int4"].file != own.file and not (b2 / own.file).exists()
    assert (b2 / m2.files["embed_tokens"].file).exists()


def test_slim_keeps_only_what_int4_reads(built, tmp_path, capsys):
    """#16: the deployment bundle of int4 holds its graphs, engines, data, tokenizer and float16 table
    only; it captions as the full bundle does, says what to pass without --precision, and refuses build."""
    from blip2_export.cli import main

    bundle, _, calib = built
    out = tmp_path / "int4-only"
    assert main(["slim", str(bundle), "-o", str(out), "--precision", "int4"]) == 0
    full, slim = load_manifest(bundle), load_manifest(out)
    assert slim.precisions() == ["int4"] and "embed_tokens" not in slim.files
    listed = {n for n, _, _ in iter_files(slim)} | {"manifest.json"}
    assert {f.name for f in out.iterdir()} == listed  # nothing else was copied
    assert not any(f.startswith(("vision.onnx", "decoder.onnx", "decoder.int8")) for f in listed)
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 0.6 * sum(f.stat().st_size for f in bundle.iterdir()), size
    img = list_images(None, count=1)[0]
    want = Blip2Runtime(bundle, precision="int4", threads=1).caption(img, max_new_tokens=6)
    assert Blip2Runtime(out, precision="int4", threads=1).caption(img, max_new_tokens=6) == want
    with pytest.raises(Blip2Error, match=r"holds int4 only: pass --precision int4"):
        Blip2Runtime(out)
    with pytest.raises(Blip2Error, match="deployment bundle"):
        build_bundle(out, BuildConfig(precision="int8", backend="ort", calib_images=calib), progress=False)
    # a file damaged in the source is refused while copying, and nothing is left behind
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    f = damaged / full.graph("vision", "int4").file
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["slim", str(damaged), "-o", str(tmp_path / "never"), "--precision", "int4"]) == 2
    assert "checksum" in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("blip2-stage-")]
