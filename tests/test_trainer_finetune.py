"""``blip2-train finetune``: a published-layout or trained BLIP-2 adapted to your own images (issue 19).

The demo model learns a shifted task (questions about counts and colours, over PNG / JPEG / RGBA PNG / BMP /
WebP files of several sizes) and the result exports with fp32 parity and runs the standard transformers
way; a published-shape OPT checkpoint and a Flan-T5 one fine-tune and export; the dataset check reports
bad records with counts and lines, and ``--skip-bad`` trains without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_standard import standard_caption
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "blip2_export" / "assets" / "demo_model"
STEPS = 250

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _finetune(*args: str) -> None:
    from trainer.cli import cli

    cli.main(args=["finetune", "--no-progress", "--precision", "fp32", *args], standalone_mode=False)


def _scores(checkpoint, data: Path) -> dict[str, float]:
    from blip2_export.export import generation_ids
    from blip2_export.modelzoo import load_checkpoint
    from trainer.dataset_check import check_jsonl
    from trainer.finetune import FinetuneConfig, answer_scores, generate_answers

    samples = check_jsonl(data / "val.jsonl").samples
    blip, tok, proc = load_checkpoint(checkpoint)
    cfg = FinetuneConfig(init=str(checkpoint), data=str(data))
    return answer_scores(generate_answers(blip, tok, proc, samples, cfg, generation_ids(blip, tok)), samples)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from trainer.data import generate_vqa_dataset

    return generate_vqa_dataset(tmp_path_factory.mktemp("vqa") / "d", {"train": 400, "val": 60, "test": 0})


@pytest.fixture(scope="module")
def finetuned(vqa, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    _finetune("--init", str(DEMO), "--data", str(vqa), "--out", str(out), "--steps", str(STEPS),
              "--batch-size", "16", "--lr", "1e-3", "--warmup", "20", "--eval-limit", "0", "--ckpt-every", "0")
    return out / "model"


def test_finetune_learns_the_shifted_task(vqa, finetuned):
    formats = {Image.open(vqa / json.loads(line)["image"]).format
               for line in (vqa / "val.jsonl").read_text().splitlines()[:18]}
    assert formats == {"PNG", "JPEG", "BMP", "WEBP"}
    before, after = _scores(DEMO, vqa)["exact_match"], _scores(finetuned, vqa)["exact_match"]
    print(f"held-out exact match: demo {before:.3f} -> fine-tuned {after:.3f}")
    assert before <= 0.05  # the demo captions; it does not answer
    assert after >= 0.6 and after - before >= 0.5


def test_only_the_qformer_and_projection_changed_and_the_layout_is_kept(finetuned):
    from safetensors.torch import load_file

    a, b = load_file(str(DEMO / "model.safetensors")), load_file(str(finetuned / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {k.split(".")[0] for k in a if not (a[k] == b[k]).all()}
    assert changed == {"qformer", "query_tokens", "language_projection"}
    assert {p.name for p in DEMO.iterdir()} | {"finetune.json"} == {p.name for p in finetuned.iterdir()}
    assert (finetuned / "tokenizer.json").read_bytes() == (DEMO / "tokenizer.json").read_bytes()


def test_finetuned_exports_passes_fp32_parity_and_runs_the_standard_way(vqa, finetuned, tmp_path):
    from blip2_export.export import export_bundle
    from blip2_export.parity import run_parity

    bundle = export_bundle(finetuned, tmp_path / "bundle", progress=False)
    images = [vqa / "images" / f"val_{i:06d}.{s}" for i, s in enumerate(["png", "jpg", "png", "bmp", "webp", "jpg"])]
    rep = run_parity(finetuned, bundle, images=images, prompts=["Question: how many are there? Answer:",
                                                                  "Question: what color is the shape? Answer:"],
                     max_new_tokens=8)
    assert rep.ok and rep.exact_sequences == len(rep.generations) == 12, rep.render()
    answers = {standard_caption(finetuned, Image.open(images[i]), "Question: how many are there? Answer:")
               for i in range(3)}
    assert answers <= {"one", "two", "three"}


def test_projection_only_and_resume(vqa, tmp_path):
    from safetensors.torch import load_file

    args = ["--init", str(DEMO), "--data", str(vqa), "--out", str(tmp_path / "p"), "--batch-size", "4",
            "--train-part", "projection", "--eval-limit", "0", "--ckpt-every", "2", "--warmup", "1"]
    _finetune(*args, "--steps", "2")
    ckpt = tmp_path / "p" / "checkpoints" / "latest.pt"
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert {k.split(".")[1] for k in state["model"]} == {"language_projection"}  # only what is trained
    _finetune(*args, "--steps", "4", "--resume", "latest")
    assert [json.loads(x)["step"] for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    a, b = load_file(str(DEMO / "model.safetensors")), load_file(str(tmp_path / "p" / "model" / "model.safetensors"))
    assert {k.split(".")[0] for k in a if not (a[k] == b[k]).all()} == {"language_projection"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_dataset_check_reports_bad_records_and_skip_bad_trains_without_them(vqa, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    good = [json.loads(x) for x in (vqa / "train.jsonl").read_text().splitlines()[:6]]
    for r in good:
        (data / r["image"]).write_bytes((vqa / r["image"]).read_bytes())
    (data / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"image": "images/nowhere.png", "caption": "a red circle"}),  # line 7: missing image
        json.dumps({"image": "images/broken.jpg", "caption": "a red circle"}),  # line 8: unreadable
        json.dumps({"image": good[0]["image"], "caption": "  "}),  # line 9: empty caption
        json.dumps(good[1]),  # line 10: duplicate of line 2
        "{not json",  # line 11
    ]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "trainer.cli", "finetune", "--init", str(DEMO), "--data", str(data), "--out",
           str(tmp_path / "out"), "--steps", "2", "--batch-size", "2", "--eval-limit", "0", "--no-progress"]
    bad = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2, bad.stderr
    err = bad.stderr
    assert "11 records, 6 good, 5 bad" in err
    for kind in ("missing image: 1", "unreadable image: 1", "empty text: 1", "duplicate: 1", "invalid JSON: 1"):
        assert kind in err, err
    assert "train.jsonl:7: missing image: images/nowhere.png" in err
    assert "train.jsonl:10: duplicate: same as line 2" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "--skip-bad" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "model").exists()
    ok = subprocess.run([*cmd, "--skip-bad"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                        check=False)
    assert ok.returncode == 0, ok.stderr
    assert "training on the 6 good records" in ok.stderr
    assert json.loads((tmp_path / "out" / "model" / "finetune.json").read_text())["finetune"]["n_train"] == 6


def test_flan_t5_checkpoint_finetunes_and_exports(vqa, tmp_path):
    from blip2_export.export import export_bundle
    from blip2_export.modelzoo import make_random_checkpoint
    from blip2_export.parity import run_parity

    ck = make_random_checkpoint(tmp_path / "t5", "tiny", llm="t5", image_size=64, patch_size=16)
    _finetune("--init", str(ck), "--data", str(vqa), "--out", str(tmp_path / "run"), "--steps", "3",
              "--batch-size", "4", "--eval-limit", "6")
    out = tmp_path / "run" / "model"
    assert json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])["final"]
    bundle = export_bundle(out, tmp_path / "bundle", progress=False)
    rep = run_parity(out, bundle, images=[vqa / "images" / "val_000000.png"],
                     prompts=["Question: how many are there? Answer:"], max_new_tokens=6)
    assert rep.ok, rep.render()


def test_published_shape_opt_finetunes_and_exports(vqa, tmp_path):
    import published_shapes as ps

    from blip2_export.export import export_bundle

    ck = ps.write_checkpoint(tmp_path / "opt", "opt")
    _finetune("--init", str(ck), "--data", str(vqa), "--out", str(tmp_path / "run"), "--steps", "2",
              "--batch-size", "2", "--eval-limit", "0", "--caption-prompt", "a photo of")
    out = tmp_path / "run" / "model"
    # the input's own layout: its tokenizer files, its config fields
    assert (out / "tokenizer.json").read_bytes() == (ck / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["text_config"]["eos_token_id"] == \
        json.loads((ck / "config.json").read_text())["text_config"]["eos_token_id"]
    bundle = export_bundle(out, tmp_path / "bundle", progress=False)
    assert (bundle / "manifest.json").is_file()
    standard_caption(out, Image.open(vqa / "images" / "val_000001.jpg"), "Question: how many are there? Answer:")
