"""Checkpoints in the published BLIP-2 layouts export, run and match eager transformers.

Built by transformers from the published config.json values (tests/published_shapes.py: ViT-g 1408 =
16 x 88, OPT-2.7B 2560 = 32 x 80 with eos "\\n", Flan-T5-XL 2048 = 32 x 64 gated-gelu without a BOS;
layers and LLM FFNs reduced), with tokenizers of the published types trained here, and read exactly as
a user's copy of the Hub folder would be: ``blip2-export export`` then parity, greedy and 3 beams at
batch 4, over an image folder with real transparency, 16-bit, CMYK, grey and EXIF-rotated images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from published_shapes import PREPROCESSOR, varied_strings, write_checkpoint, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The acceptance images (RGBA with transparency, 16-bit PNG, CMYK JPEG, grey JPEG) for generation;
# every image of the folder goes through the preprocess comparison.
GEN_IMAGES = ("rgba_transparent.png", "grey16.png", "cmyk.jpg", "grey.jpg")
PROMPTS = ("", "Question: was ist größer, der Hund oder das Café? Answer:")
NEW_TOKENS = 8
ARTIFACTS = ("Ġ", "▁", "Ċ", "</s>", "<s>", "<pad>", "<unk>", "<image>", "[CLS]", "[SEP]", "[PAD]", "<extra_id")
_BUILT: dict = {}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("published-images"))


def _built(tmp_path_factory, family: str):
    """(checkpoint, bundle, (model, tokenizer, processor)) for ``family``, exported by the CLI once."""
    if family not in _BUILT:
        from blip2_export.cli import main
        from blip2_export.modelzoo import load_checkpoint, load_retrieval_checkpoint

        root = tmp_path_factory.mktemp(f"published-{family}")
        ckpt = write_checkpoint(root / "ckpt", family)
        assert main(["export", str(ckpt), "-o", str(root / "bundle"), "--max-context", "96"]) == 0
        loaded = (load_retrieval_checkpoint if family == "itm" else load_checkpoint)(ckpt)
        _BUILT[family] = (ckpt, root / "bundle", loaded)
    return _BUILT[family]


@pytest.fixture(scope="module", params=["opt", "t5"])
def captioner(request, tmp_path_factory):
    return _built(tmp_path_factory, request.param)


# -- the published semantics read from the folder --------------------------------------------------------
def test_facts_come_from_the_published_fields(captioner):
    from runtime.manifest import load_manifest

    ckpt, bundle, (_, tok, _) = captioner
    m = load_manifest(bundle).model
    raw = json.loads((ckpt / "config.json").read_text())
    t = raw["text_config"]
    assert m.image_token_id == raw["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    assert m.num_query_tokens == 32 and m.image_size == 224 and m.patches == 257 and m.vision_hidden == 1408
    assert m.vocab_size == t["vocab_size"] > len(tok)  # padded vocabulary, as published
    if m.llm_type == "opt":
        assert (m.llm_hidden, m.llm_heads, m.head_dim) == (2560, 32, 80)
        # published OPT stops on "\n" (text_config.eos_token_id 50118), not on the tokenizer's </s>
        assert m.eos_token_ids == (t["eos_token_id"],) and tok.convert_ids_to_tokens(t["eos_token_id"]) == "Ċ"
        assert m.bos_token_id == tok.bos_token_id == tok.convert_tokens_to_ids("</s>")
    else:
        assert (m.llm_hidden, m.llm_heads, m.head_dim) == (2048, 32, 64)
        assert "bos_token_id" not in t and m.bos_token_id is None  # T5 has no BOS
        assert (m.decoder_start_token_id, m.eos_token_ids, m.pad_token_id) == (0, (1,), 0)


# -- generation: eager generate text == bundle text -----------------------------------------------------
@pytest.mark.parametrize("beams,batch", [(1, 1), (3, 4)])
def test_parity_token_identical(captioner, images, beams, batch):
    from blip2_export.parity import run_parity

    ckpt, bundle, loaded = captioner
    rep = run_parity(ckpt, bundle, images=[images / f for f in GEN_IMAGES], prompts=PROMPTS, num_beams=beams,
                     batch=batch, max_new_tokens=NEW_TOKENS, model_and_tokenizer=loaded, logits_diff=False,
                     threads=1)
    assert rep.ok, rep.render()
    assert rep.exact_sequences == len(GEN_IMAGES) * len(PROMPTS)
    assert rep.stages[0].name == "preprocess" and rep.stages[0].max_abs < 1e-5
    for g in rep.generations:
        assert g.eager_text == g.runtime_text
        assert not any(a in g.runtime_text for a in ARTIFACTS), g.runtime_text
    assert any(g.runtime_ids for g in rep.generations)


def test_cli_parity_beams_batch_passes(captioner, images, tmp_path, capsys):
    from blip2_export.cli import main

    ckpt, bundle, _ = captioner
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Question: what is in the picture? Answer:\n", encoding="utf-8")
    sub = tmp_path / "imgs"
    sub.mkdir()
    for f in GEN_IMAGES[:2]:
        (sub / f).write_bytes((images / f).read_bytes())
    code = main(["parity", str(ckpt), str(bundle), "--images", str(sub), "--prompts", str(prompts),
                 "--beams", "3", "--batch", "4", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert out.out.rstrip().endswith("PASS")


def test_retrieval_published_shape_parity(tmp_path_factory, images):
    from blip2_export.parity import run_retrieval_parity

    ckpt, bundle, loaded = _built(tmp_path_factory, "itm")
    texts = ["a photo of a cat", "Question: was ist größer? Answer:", "東京の写真 🙂", "two dogs on the table"]
    rep = run_retrieval_parity(ckpt, bundle, images=[images / f for f in GEN_IMAGES], texts=texts,
                               model_and_tokenizer=loaded, threads=1)
    assert rep.ok, rep.render()


# -- tokenizers: the bundle's encode/decode == transformers' ---------------------------------------------
def test_tokenizer_round_trip_1000_strings(captioner):
    from runtime.text import TextTokenizer

    _, bundle, (_, tok, _) = captioner
    ours = TextTokenizer(bundle / "tokenizer.json")
    strings = varied_strings(1000, seed=7)
    assert len(set(strings)) > 900
    for s in strings:
        ids = ours.encode(s)
        assert ids == tok(s).input_ids, s
        text = ours.decode(ids)
        assert text == tok.decode(ids, skip_special_tokens=True), s
        assert "Ġ" not in text and "▁" not in text and "</s>" not in text


def test_tokenizer_framing_is_the_published_one(captioner):
    _, _, (model, tok, _) = captioner
    ids = tok("a photo").input_ids
    if model.config.use_decoder_only_language_model:
        assert ids[0] == tok.convert_tokens_to_ids("</s>") and ids[-1] != ids[0]  # OPT: </s> prepended
    else:
        assert ids[-1] == tok.eos_token_id == 1 and tok.convert_tokens_to_ids("<extra_id_0>") is not None


# -- preprocessing == the checkpoint's own processor, on every mode ----------------------------------
def _processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(**{k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type",
                                                                                   "processor_class")})


def test_preprocess_equals_processor_on_every_image(images, tmp_path):
    from PIL import Image

    from blip2_export.export import preprocess_facts
    from runtime.preprocess import load_image, preprocess

    proc = _processor()
    cfg = preprocess_facts(proc, 224)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "tiny.png")
    big = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "huge.jpg", quality=80)
    files = sorted(images.iterdir()) + [tmp_path / "tiny.png", tmp_path / "huge.jpg"]
    for f in files:
        ours = preprocess([f], cfg)
        ref = proc(images=[load_image(f)], return_tensors="np")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        assert np.abs(ours - ref).max() < 1e-6, f.name


def test_transparency_is_composited_on_white(images):
    """Dropping alpha (the old behaviour) differs from transformers by whole levels on this image."""
    from PIL import Image

    from runtime.preprocess import to_rgb

    img = Image.open(images / "rgba_transparent.png")
    composited = np.asarray(to_rgb(img), dtype=int)
    dropped = np.asarray(img.convert("RGB"), dtype=int)
    assert np.abs(composited - dropped).max() > 200
    assert (composited[:, 0] == 255).all()  # alpha 0 column: white


def test_exif_orientation_as_transformers_load_image(images):
    from transformers.image_utils import load_image as hf_load_image

    from runtime.preprocess import load_image

    ours, theirs = load_image(images / "exif_rotated.jpg"), hf_load_image(str(images / "exif_rotated.jpg"))
    assert ours.size == theirs.size == (72, 48)
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs))


def test_processor_switches_are_replayed(images):
    from blip2_export.export import preprocess_facts
    from runtime.preprocess import load_image, preprocess

    for change in ({"do_normalize": False}, {"do_rescale": False}, {"resample": 2},
                   {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}):
        proc = _processor()
        for k, v in change.items():
            setattr(proc, k, v)
        cfg = preprocess_facts(proc, 224)
        f = images / "rgba_transparent.png"
        ref = proc(images=[load_image(f)], return_tensors="np")["pixel_values"]
        assert np.abs(preprocess([f], cfg) - ref).max() < 1e-4, change


@pytest.mark.parametrize("change,field", [({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
                                           "do_center_crop"),
                                          ({"size": {"shortest_edge": 224}}, "size"),
                                          ({"size": {"height": 384, "width": 384}}, "image_size")])
def test_unservable_processor_is_one_line_naming_the_field(change, field):
    from transformers import BlipImageProcessor

    from blip2_export.export import preprocess_facts
    from runtime.errors import Blip2Error

    kw = {k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    kw.update(change)
    with pytest.raises(Blip2Error, match=field) as e:
        preprocess_facts(BlipImageProcessor(**kw), 224)
    assert "\n" not in str(e.value)


# -- layouts: shards and dtypes, missing fields, the reference version ----------------------------------
def test_bf16_sharded_checkpoint_exports_token_identical(tmp_path):
    """bf16 weights in shards with model.safetensors.index.json (the published fp16/bf16 uploads)."""
    import torch

    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import (
        build_random_model,
        checkpoint_identity,
        load_checkpoint,
    )
    from blip2_export.parity import run_parity

    model, tok, proc = build_random_model("tiny", seed=3)
    ckpt = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="100KB")
    tok.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    bundle = export_bundle(ckpt, tmp_path / "bundle", ExportConfig(max_context=64), progress=False)
    from runtime.manifest import load_manifest

    assert load_manifest(bundle).source["weights_sha256"] == checkpoint_identity(ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded[0].dtype == torch.float32  # bf16 values widened exactly
    rep = run_parity(ckpt, bundle, prompts=("", "a photo of"), max_new_tokens=8, model_and_tokenizer=loaded,
                     logits_diff=False, threads=1)
    assert rep.ok and rep.exact_sequences == len(rep.generations), rep.render()


def test_t5_without_decoder_start_is_one_line_naming_the_field():
    from blip2_export.export import model_facts
    from blip2_export.modelzoo import build_random_model
    from runtime.errors import Blip2Error

    model, tok, _ = build_random_model("tiny", llm="t5")
    facts = model_facts(model, tok)
    assert facts.decoder_start_token_id == 0 and facts.bos_token_id is not None
    for cfg in (model.config.text_config, model.language_model.config):
        for field in ("decoder_start_token_id", "bos_token_id"):
            if field in cfg.__dict__:
                delattr(cfg, field)
    for gen in (model.generation_config, model.language_model.generation_config):
        gen.decoder_start_token_id = gen.bos_token_id = None
    tok.bos_token = None
    with pytest.raises(Blip2Error, match="decoder_start_token_id") as e:
        model_facts(model, tok)
    assert "\n" not in str(e.value)
    # ... and generation_config.json alone is enough, as transformers reads it
    model.generation_config.decoder_start_token_id = 0
    assert model_facts(model, tok).decoder_start_token_id == 0


def test_image_token_outside_the_table_is_one_line():
    from blip2_export.export import model_facts
    from blip2_export.modelzoo import build_random_model
    from runtime.errors import Blip2Error

    model, tok, _ = build_random_model("tiny")
    model.config.image_token_index = 10 ** 6
    with pytest.raises(Blip2Error, match="image_token_index"):
        model_facts(model, tok)


def test_parity_warns_when_the_eager_transformers_differs_from_the_export():
    import torch
    import transformers

    from blip2_export.parity import reference_drift

    same = {"transformers": transformers.__version__, "torch": torch.__version__}
    assert reference_drift(same) == []
    lines = reference_drift({**same, "transformers": "5.23.0"})
    assert len(lines) == 1 and "transformers 5.23.0" in lines[0] and transformers.__version__ in lines[0]


def test_pyproject_pins_the_reference_to_the_installed_versions():
    """The tested ranges in pyproject.toml hold what this machine runs the tests with."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import onnxruntime
    import torch
    import transformers
    from packaging.requirements import Requirement

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["export"]]
    pins = {r.name: r.specifier for r in reqs}
    for name, version in (("transformers", transformers.__version__), ("onnxruntime", onnxruntime.__version__),
                          ("torch", torch.__version__.split("+")[0])):
        assert pins[name].contains(version), f"{name} {version} outside {pins[name]}"
        assert any(s.operator == "<" for s in pins[name]), f"{name} has no upper bound: {pins[name]}"
