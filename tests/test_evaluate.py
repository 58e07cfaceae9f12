"""``blip2-export evaluate``: task quality of a bundle on a captioned JSONL dataset, per precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from blip2_export.cli import main
from blip2_export.evaluate import evaluate
from runtime.errors import Blip2Error


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    (root / "images").mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a red circle {'on the left' * (i % 2)}"}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_caption_scores_match_what_the_runtime_generates(tiny_bundle, dataset):
    from runtime.pipeline import Blip2Runtime

    q = evaluate(tiny_bundle, dataset, limit=6, max_new_tokens=5)
    assert q.items == 6 and 0.0 <= q.word_accuracy <= 1.0
    # make the references equal to the model's own captions: exact match must then be 1.0
    rt = Blip2Runtime(tiny_bundle)
    lines = []
    for i in range(6):
        text = rt.caption(str(dataset / "images" / f"{i}.png"), max_new_tokens=5)
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": text}))
    (dataset / "own.jsonl").write_text("\n".join(lines))
    own = evaluate(tiny_bundle, dataset, split="own", limit=6, max_new_tokens=5)
    assert own.exact_match == 1.0 and own.word_accuracy == 1.0
    assert q.exact_match < 1.0


def test_cli_compares_precisions(bundle_copy, dataset, capsys):
    assert main(["build", str(bundle_copy), "--precision", "fp16"]) == 0
    capsys.readouterr()
    code = main(["evaluate", str(bundle_copy), "--data", str(dataset), "--precision", "fp32",
                 "--precision", "fp16", "--limit", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "fp32 on 4 test items" in out and "points vs fp32" in out


def test_bad_dataset_is_refused(tiny_bundle, tmp_path):
    with pytest.raises(Blip2Error, match="test.jsonl"):
        evaluate(tiny_bundle, tmp_path)
    (tmp_path / "test.jsonl").write_text("not json\n")
    with pytest.raises(Blip2Error, match="JSON line"):
        evaluate(tiny_bundle, tmp_path)
