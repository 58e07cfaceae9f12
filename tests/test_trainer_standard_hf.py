"""Every BLIP-2 folder the trainer writes runs the standard transformers way (issue 19).

The demo model, and stage 1 / stage 2 (OPT and T5) / publish-demo outputs of a quick recipe run:
``Blip2Processor.from_pretrained(dir)(images=..., text=...)`` then ``generate`` and
``pipeline("image-text-to-text")`` (stage 1: the processor and ``Blip2ForImageTextRetrieval``).
The fine-tune output is checked in tests/test_trainer_finetune.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_standard import standard_caption, standard_retrieval
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "blip2_export" / "assets" / "demo_model"
SAMPLES = ROOT / "blip2_export" / "assets" / "sample_images"
# the demo weights are the trained ones of docs/trainer.md: regenerating its config files must not touch them
DEMO_WEIGHTS_SHA256 = "ba88a57c36d5fd523534b37356f0dea2dd3162871dabb96b5d1a40e657dab430"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_model_runs_the_standard_way():
    from transformers import AddedToken, Blip2Processor

    from runtime.integrity import sha256_file

    assert sha256_file(DEMO / "model.safetensors") == DEMO_WEIGHTS_SHA256
    proc = Blip2Processor.from_pretrained(DEMO)
    assert isinstance(proc.image_token, AddedToken) and proc.image_token.content == "<image>"
    rows = json.loads((SAMPLES / "captions.json").read_text())
    for row in rows[:3]:
        img = Image.open(SAMPLES / row["image"])
        assert standard_caption(DEMO, img) == row["generated"] == row["reference"]
    # the first try: a prompt, return_tensors="pt" (was: OverflowError in the tokenizer's truncation)
    out = proc(images=Image.open(SAMPLES / "sample_0.png"), text="a photo of", return_tensors="pt")
    assert out["input_ids"].shape == (1, 32 + 4) and out["pixel_values"].shape == (1, 3, 64, 64)
    standard_caption(DEMO, Image.open(SAMPLES / "sample_1.png"), "a photo of")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from trainer.recipe import run_recipe

    out = tmp_path_factory.mktemp("recipe") / "quick"
    run_recipe(out, t5=True, quick=True)
    return out


@pytest.fixture(scope="module")
def image(recipe):
    rec = json.loads((recipe / "data" / "test.jsonl").read_text().splitlines()[0])
    return Image.open(recipe / "data" / rec["image"])


@pytest.mark.parametrize("stage", ["stage2-opt", "stage2-t5"])
def test_stage2_outputs_run_the_standard_way(recipe, image, stage):
    text = standard_caption(recipe / stage / "model", image)
    assert text  # a trained (if briefly) captioner says something
    standard_caption(recipe / stage / "model", image, "a photo of")


def test_stage1_output_runs_the_standard_way(recipe, image):
    from trainer.models import Stage1, tokenize

    folder = recipe / "stage1" / "model"
    texts = ["a small red circle on the left", "three large blue squares at the top", "two green triangles"]
    p = standard_retrieval(folder, image, texts)
    s1 = Stage1.load(folder)
    ids, att = tokenize(s1.tokenizer, texts)
    from transformers import Blip2Processor

    px = Blip2Processor.from_pretrained(folder)(images=[image] * 3, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = s1.itm_logits(s1.image_embeds(px), ids, att).softmax(-1)[:, 1]
    assert torch.allclose(p, ours, atol=1e-5)  # the processor's inputs are the ones stage 1 trained on


def test_published_demo_runs_the_standard_way(recipe, image, tmp_path):
    from trainer.recipe import publish_demo

    publish_demo(recipe / "stage2-opt" / "model", recipe / "data", tmp_path / "demo", tmp_path / "imgs", 2)
    assert standard_caption(tmp_path / "demo", image) == standard_caption(recipe / "stage2-opt" / "model", image)


def test_standardize_tokenizer_files_fixes_the_processor(tmp_path):
    """The two causes, each on its own: a saved truncation max_length and a named image_token."""
    import shutil

    from transformers import Blip2Processor

    from blip2_export.modelzoo import standardize_tokenizer_files

    img = Image.open(SAMPLES / "sample_0.png")
    for key, value, error in [("max_length", 31, OverflowError), ("image_token", "<image>", AttributeError)]:
        d = tmp_path / key
        shutil.copytree(DEMO, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg[key] = value
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        with pytest.raises(error):
            Blip2Processor.from_pretrained(d)(images=img, text="a photo of")
        assert standardize_tokenizer_files(d)
        Blip2Processor.from_pretrained(d)(images=img, text="a photo of")
