"""The synthetic dataset: deterministic, captions that say what the image shows, the JSONL format."""

import json

import pytest

from runtime.errors import Blip2Error
from trainer import data
from trainer.evaluate import caption_scores, parse_caption


def test_generator_is_deterministic(tmp_path):
    a = data.generate_dataset(tmp_path / "a", {"train": 12, "val": 3, "test": 3}, seed=7, image_size=32)
    b = data.generate_dataset(tmp_path / "b", {"train": 12, "val": 3, "test": 3}, seed=7, image_size=32)
    c = data.generate_dataset(tmp_path / "c", {"train": 12, "val": 3, "test": 3}, seed=8, image_size=32)
    for split in data.SPLITS:
        assert (a / f"{split}.jsonl").read_text() == (b / f"{split}.jsonl").read_text()
    for rec in data.read_jsonl(a / "train.jsonl"):
        assert (a / rec["image"]).read_bytes() == (b / rec["image"]).read_bytes()
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()


def test_records_are_lavis_style_and_captions_match_labels(tmp_path):
    d = data.generate_dataset(tmp_path / "d", {"train": 40, "val": 0, "test": 5}, image_size=32)
    recs = data.read_jsonl(d / "train.jsonl")
    assert len(recs) == 40 and (d / "val.jsonl").read_text() == ""
    vocab = set(data.vocabulary())
    for r in recs:
        assert {"image", "caption"} <= set(r)
        assert set(r["caption"].split()) <= vocab
        assert parse_caption(r["caption"]) == {a: r[a] for a in data.ATTRIBUTES}
    records, px = data.load_split(d, "test", 32)
    assert px.shape == (5, 3, 32, 32) and len(records) == 5


def test_scene_pixels_show_the_colour_in_the_named_region():
    import random

    import numpy as np

    scene = data.Scene(count=1, size="large", colour="red", shape="square", position="left")
    img = np.asarray(data.render(scene, random.Random(0), 64)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100)
    _, xs = np.nonzero(red)
    assert red.sum() > 20 and xs.max() < 0.35 * 64


def test_caption_scores_count_attributes():
    s = caption_scores(["a small red circle on the left", "two large blue squares at the top"],
                       ["a small red circle on the left", "two large blue squares at the bottom"])
    assert s["exact_match"] == 0.5 and s["acc_colour"] == 1.0 and s["acc_position"] == 0.5


def test_bad_jsonl_is_a_user_error(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"img": "x.png"}) + "\n")
    with pytest.raises(Blip2Error, match="needs the keys"):
        data.read_jsonl(tmp_path / "train.jsonl")
    with pytest.raises(Blip2Error, match="not found"):
        data.read_jsonl(tmp_path / "missing.jsonl")


def test_corrupt_captions_swaps_the_requested_share():
    from trainer.capfilt import corrupt_captions

    recs = [{"image": f"{i}.png", "caption": f"cap {i % 7}"} for i in range(100)]
    noisy = corrupt_captions(recs, 0.3, seed=1)
    flagged = [r for r in noisy if r["noisy"]]
    assert len(flagged) == 30
    assert all(r["caption"] != recs[int(r["image"][:-4])]["caption"] for r in flagged)
    assert all(r["caption"] == recs[i]["caption"] for i, r in enumerate(noisy) if not r["noisy"])


def test_cli_help_teaches_every_command():
    from click.testing import CliRunner

    from trainer.cli import cli

    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for cmd in ("data", "unimodal", "stage1", "stage2", "eval", "capfilt", "recipe"):
        assert cmd in res.output
    assert "--resume" in CliRunner().invoke(cli, ["stage1", "--help"]).output
