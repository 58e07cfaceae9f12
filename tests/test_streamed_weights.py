"""Weights streamed from the checkpoint to the graphs (#13), on tiny models: same graphs, same values,
weights stored once, and the engine's shared data file still checked like every bundle file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blip2_export.export import ExportConfig, export_bundle


@pytest.fixture(scope="module")
def external_bundle(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with every weight in external data (as a large model is)."""
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("ext") / "b",
                         ExportConfig(max_context=128, external_data_threshold=0), progress=False)


def _outputs(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_streamed_export_equals_the_in_memory_model(tiny_checkpoint, tiny_model, tmp_path):
    """The lazily loaded model (weights read from the safetensors per tensor) and the loaded model give
    graphs of the same structure computing the same values."""
    import collections

    import onnx

    lazy = export_bundle(tiny_checkpoint, tmp_path / "lazy", ExportConfig(max_context=128, ort_engine=False),
                         progress=False)
    loaded = export_bundle(None, tmp_path / "loaded", ExportConfig(max_context=128, ort_engine=False),
                           progress=False, model_and_tokenizer=tiny_model)
    rng = np.random.default_rng(0)
    for name, feeds in (("vision", {"pixel_values": rng.standard_normal((2, 3, 32, 32), dtype=np.float32)}),
                        ("qformer", {"image_embeds": rng.standard_normal((2, 17, 32), dtype=np.float32)})):
        a, b = onnx.load(str(lazy / f"{name}.onnx")), onnx.load(str(loaded / f"{name}.onnx"))
        ops = collections.Counter(n.op_type for n in a.graph.node)
        ops_b = collections.Counter(n.op_type for n in b.graph.node)
        ops_b["Identity"] = ops["Identity"]  # the exporter shares equal-valued weights it can see
        assert ops == ops_b, name
        assert "Transpose" not in {n.op_type for n in a.graph.node if n.input and n.input[0] in
                                   {t.name for t in a.graph.initializer}}, "a weight transpose was left unfolded"
        for x, y in zip(_outputs(lazy / f"{name}.onnx", feeds), _outputs(loaded / f"{name}.onnx", feeds)):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.load(lazy / "embed_tokens.npy"), np.load(loaded / "embed_tokens.npy"))


def test_engine_shares_the_decoder_data_file_and_generates_the_same(external_bundle, tiny_checkpoint, tiny_model):
    m = json.loads((external_bundle / "manifest.json").read_text())
    dec = m["graphs"]["fp32"]["decoder"]
    engine = dec["notes"]["ort_engine"]
    assert "decoder.onnx.data" in engine["external_data"]  # unchanged weights: read from the graph's own file
    assert "decoder.onnx.data" not in {e["file"] for e in dec["engines"]}  # one role: the graph's data file
    own = [f for f in engine["external_data"] if f != "decoder.onnx.data"]
    portable = (external_bundle / "decoder.onnx.data").stat().st_size
    assert all((external_bundle / f).stat().st_size < 0.5 * portable for f in own)  # only the packed q|k|v

    from blip2_export.parity import list_images, run_parity

    rep = run_parity(tiny_checkpoint, external_bundle, images=list_images(None, count=2), prompts=("", "a photo of"),
                     max_new_tokens=8, model_and_tokenizer=tiny_model)
    assert rep.ok and rep.token_agreement == 1.0, rep.render()


def test_engine_may_not_share_another_graphs_data_file(external_bundle, tmp_path):
    """Sharing is with the engine's own portable graph only: naming another graph's data file is refused."""
    import shutil

    from runtime.errors import BundleError
    from runtime.manifest import load_manifest

    bundle = tmp_path / "b"
    shutil.copytree(external_bundle, bundle)
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["graphs"]["fp32"]["decoder"]["notes"]["ort_engine"]["external_data"].append("vision.onnx.data")
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="ort_engine"):
        load_manifest(bundle)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_checkpoint_tensors_are_read_as_transformers_reads_them(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    from blip2_export.weights import CheckpointWeights

    t = {"a.weight": torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype)),
         "b.bias": torch.randn(7).to(getattr(torch, dtype))}
    save_file(t, str(tmp_path / "model.safetensors"))

    class NoParams:
        def named_parameters(self, remove_duplicate=False):
            return []

    w = CheckpointWeights(tmp_path, NoParams())
    for k, v in t.items():
        got = w.read(k)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v.float().numpy())


def test_int8_engine_built_from_external_data_equals_the_in_memory_build(tiny_bundle, tmp_path):
    """The int8 decoder engine (MatMulNBits lowering, then q|k|v packing of the lowered weights) built
    from a graph whose weights are on disk: the same graph and values as built from inline weights, and
    its data file holds only the tensors it uses (the lowered q/k/v weights packing replaced are gone)."""
    import onnx

    from engines.int8 import quantize_weights
    from engines.onnx_utils import save_model_atomic
    from engines.ort_optimize import build_decoder_engine
    from engines.tensor_store import external_info, is_external, load_lazy, tensor_array, tensor_nbytes
    from runtime.manifest import load_manifest

    m = load_manifest(tiny_bundle)
    io = m.expected_io("decoder", "float32")
    q = quantize_weights(tiny_bundle / "decoder.onnx", "decoder", io).model
    inline, external = tmp_path / "inline", tmp_path / "external"
    inline.mkdir()
    external.mkdir()
    save_model_atomic(onnx.ModelProto.FromString(q.SerializeToString()), inline / "d.onnx")
    assert save_model_atomic(q, external / "d.onnx", external_threshold=0) == ["d.onnx.data"]
    f = m.model
    kw = {"layers": f.llm_layers, "heads": f.llm_heads, "head_dim": f.head_dim}
    ext_a, notes_a = build_decoder_engine(inline / "d.onnx", inline / "e.onnx", **kw)
    ext_b, notes_b = build_decoder_engine(external / "d.onnx", external / "e.onnx", **kw)
    assert ext_a == [] and ext_b == ["e.onnx.data", "d.onnx.data"]  # shares the int8 graph's weights
    assert notes_a["qkv_packed"] == notes_b["qkv_packed"] == f.llm_layers
    a, b = load_lazy(inline / "e.onnx"), load_lazy(external / "e.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    inits_b = {t.name: t for t in b.graph.initializer}
    for t in a.graph.initializer:
        np.testing.assert_array_equal(tensor_array(t), tensor_array(inits_b[t.name]))
    own = [t for t in b.graph.initializer if is_external(t) and external_info(t)["location"].endswith("e.onnx.data")]
    used = sum(tensor_nbytes(t) for t in own)
    assert (external / "e.onnx.data").stat().st_size <= used + 64 * len(own)
