"""The bundle: graphs + manifest (IO from the contract, dim ranges, checksums) + tokenizer + embeddings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from blip2_export.export import ExportConfig, export_bundle
from runtime import contract
from runtime.errors import Blip2Error, BundleError
from runtime.integrity import sha256_file
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime


def test_manifest_declares_graphs_from_the_contract(tiny_bundle, tiny_model):
    m = load_manifest(tiny_bundle)
    model = tiny_model[0]
    f = m.model
    assert f.num_query_tokens == model.config.num_query_tokens
    assert f.image_token_id == model.config.image_token_index
    assert f.llm_layers == model.config.text_config.num_hidden_layers
    assert set(m.graphs["fp32"]) == {"vision", "qformer", "decoder"}
    for name, rec in m.graphs["fp32"].items():
        g = onnx.load(str(tiny_bundle / rec.file), load_external_data=False)
        assert [i.name for i in g.graph.input] == [t.name for t in rec.io.inputs]
        assert [o.name for o in g.graph.output] == [t.name for t in rec.io.outputs]
        assert rec.io == m.expected_io(name)
        assert rec.sha256 == sha256_file(tiny_bundle / rec.file)
    dec = m.graphs["fp32"]["decoder"].io
    assert dec.input_names()[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert dec.input_names()[3:5] == [contract.past_name(0, "key"), contract.past_name(0, "value")]
    assert m.dims["past"].min == 0 and m.dims["total"].max == 128


def test_dynamic_dims_are_symbolic_in_the_onnx_graphs(tiny_bundle):
    m = load_manifest(tiny_bundle)
    g = onnx.load(str(tiny_bundle / m.graphs["fp32"]["decoder"].file))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["past.0.key"][2] == "past"


def test_embedding_table_and_tokenizer(tiny_bundle, tiny_model):
    model, tok, _ = tiny_model
    table = np.load(tiny_bundle / "embed_tokens.npy", allow_pickle=False)
    assert np.array_equal(table, model.get_input_embeddings().weight.detach().numpy())
    rt = Blip2Runtime(tiny_bundle)
    for text in ["", "a photo of", "Question: what color is the cat? Answer:", "zebra unknown words"]:
        assert rt.tokenizer.encode(text) == tok(text).input_ids


def test_preprocess_and_versions_recorded(tiny_bundle):
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    assert raw["preprocess"]["resample"] == "bicubic"
    assert raw["preprocess"]["height"] == 32
    assert {"torch", "transformers", "onnx", "blip2_export"} <= set(raw["versions"])
    assert len(raw["source"]["weights_sha256"]) == 64


def test_external_data_for_large_graphs(tiny_checkpoint, tiny_bundle, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "ext", ExportConfig(external_data_threshold=0), progress=False)
    m = load_manifest(out)
    for rec in m.graphs["fp32"].values():
        assert [e.file for e in rec.external_data] == [rec.file + ".data"]
        assert (out / rec.file).stat().st_size < rec.external_data[0].bytes  # weights live in the .data file
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = Blip2Runtime(out).generate([img], ["a photo of"], max_new_tokens=8)[0].token_ids
    b = Blip2Runtime(tiny_bundle).generate([img], ["a photo of"], max_new_tokens=8)[0].token_ids
    assert a == b
    (out / m.graphs["fp32"]["vision"].external_data[0].file).write_bytes(b"\0" * 10)
    with pytest.raises(BundleError, match="vision.onnx.data"):
        load_manifest(out)


def test_export_puts_wrappers_in_eval_mode(tmp_path):
    """A model left in training mode with dropout still exports the deterministic eval graph."""
    import torch

    from blip2_export.modelzoo import build_random_model
    from blip2_export.graphs import VisionGraph

    model, tok, proc = build_random_model("tiny", seed=3)
    model.vision_model.config.attention_dropout = 0.5
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.5
    model.train()
    out = export_bundle(None, tmp_path / "b", progress=False, model_and_tokenizer=(model, tok, proc))
    rt = Blip2Runtime(out)
    pv = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        ref = VisionGraph(model)(torch.from_numpy(pv)).numpy()
    got = rt.image_embeds(pv)
    assert np.abs(got - ref).max() < 1e-4
    assert np.array_equal(got, rt.image_embeds(pv))  # no dropout at run time


@pytest.mark.parametrize("kw,msg", [(dict(max_batch=0), "--max-batch"), (dict(opset=9), "--opset"),
                                    (dict(max_context=4), "--max-context"), (dict(max_context=10**6), "--max-context")])
def test_export_config_is_validated_before_work(tiny_checkpoint, tmp_path, kw, msg):
    with pytest.raises(Blip2Error, match=msg):
        export_bundle(tiny_checkpoint, tmp_path / "b", ExportConfig(**kw), progress=False)
    assert not (tmp_path / "b").exists()


def test_sharded_checkpoint_loads(tiny_model, tmp_path):
    from blip2_export.modelzoo import load_checkpoint

    model, tok, proc = tiny_model
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tok.save_pretrained(tmp_path / "sharded")
    proc.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded, _, _ = load_checkpoint(tmp_path / "sharded")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch_equal(a, b), n


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)
