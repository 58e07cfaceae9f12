"""The full offline recipe in one call: data -> unimodal -> stage 1 -> stage 2 -> scores on the test split.

Each stage trains into its own run folder under ``out``; a stage whose ``model/`` exists is kept, a
stage that was killed resumes from ``checkpoints/latest.pt``. ``report.json`` collects the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from blip2_export.modelzoo import load_checkpoint
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory, atomic_write_text
from trainer import data, evaluate
from trainer.capfilt import capfilt as run_capfilt
from trainer.capfilt import corrupt_captions
from trainer.data import generate_dataset, read_jsonl
from trainer.models import TRAINER_SPEC, Stage1, generate_captions, tokenize
from trainer.tasks import Stage1Task, Stage2Task
from trainer.train import LoopConfig, train
from trainer.unimodal import TextTask, VisionTask

# steps per stage (batch 64): about 10 minutes on 2 CPU cores
FULL = {"data": {"train": 8000, "val": 500, "test": 500}, "vision": 800, "lm": 400, "stage1": 500,
        "stage2": 600, "eval_every": 250}
QUICK = {"data": {"train": 256, "val": 100, "test": 100}, "vision": 20, "lm": 20, "stage1": 20,
         "stage2": 20, "eval_every": 0}
QUICK_SIZES = {"vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "vision_ffn": 64, "qformer_hidden": 32,
               "qformer_layers": 2, "qformer_heads": 2, "qformer_ffn": 64, "llm_hidden": 32, "llm_layers": 2,
               "llm_heads": 2, "llm_ffn": 64}


def score(data_dir, stage1_dir=None, stage2_dir=None, split: str = "test", limit: int = 500,
          rerank_k: int = 0) -> dict:
    """Test-split numbers: R@1 both ways among 100 candidates (stage 1); captions (stage 2)."""

    out: dict = {}
    if stage1_dir:
        s1 = Stage1.load(stage1_dir)
        recs, px = data.load_split(data_dir, split, s1.spec.image_size, limit)
        caps = [r["caption"] for r in recs]
        ids, att = tokenize(s1.tokenizer, caps)
        out["retrieval"] = evaluate.retrieval_scores(s1, caps, px, ids, att, 100, rerank_k)
    if stage2_dir:
        blip, tok, proc = load_checkpoint(stage2_dir)
        recs, px = data.load_split(data_dir, split, proc.size["height"], limit)
        preds = generate_captions(blip, tok, px)
        out["captions"] = evaluate.caption_scores(preds, [r["caption"] for r in recs])
        out["caption_examples"] = [{"image": r["image"], "reference": r["caption"], "generated": p}
                                   for r, p in list(zip(recs, preds))[:5]]
    return out


def _stage(task, folder: Path, steps: int, threads: int, timings: dict, device: str = "auto", **kw) -> str:
    model = folder / "model"
    if not model.is_dir():
        t = time.time()
        cfg = LoopConfig(out=str(folder), steps=steps, batch_size=64, warmup=min(30, steps // 4 + 1),
                         lr=kw.pop("lr", 5e-4), ckpt_every=50, resume="latest", threads=threads, device=device,
                         **kw)
        train(task, cfg)
        timings[folder.name] = round(time.time() - t, 1)
    return str(model)


def run_recipe(out: str | Path, t5: bool = False, ablations: bool = False, capfilt: bool = False,
               quick: bool = False, threads: int = 1, device: str = "auto") -> dict:

    torch.set_num_threads(threads)
    out = Path(out)
    plan = QUICK if quick else FULL
    spec = dataclasses.replace(TRAINER_SPEC, **QUICK_SIZES) if quick else TRAINER_SPEC
    t_start, cpu_start = time.time(), time.process_time()
    timings: dict[str, float] = {}
    data_dir = out / "data"
    if not data_dir.is_dir():
        t = time.time()
        generate_dataset(data_dir, plan["data"], image_size=spec.image_size)
        timings["data"] = round(time.time() - t, 1)
    d = str(data_dir)
    ev = plan["eval_every"]

    def stage(task, folder: Path, steps: int, **kw) -> str:
        return _stage(task, folder, steps, threads, timings, device=device, **kw)

    vision = stage(VisionTask(d, spec), out / "vision", plan["vision"], lr=1e-3)
    opt = stage(TextTask(d, spec), out / "opt", plan["lm"], lr=1e-3)
    s1 = stage(Stage1Task(d, spec, vision), out / "stage1", plan["stage1"], eval_every=ev, lr=1e-3)
    s2 = stage(Stage2Task(d, spec, opt, s1), out / "stage2-opt", plan["stage2"], eval_every=ev, lr=2e-3)
    report: dict = {"out": str(out), "quick": quick}
    report["test"] = score(d, s1, s2)
    if t5:
        spec5 = dataclasses.replace(spec, llm="t5")
        lm5 = stage(TextTask(d, spec5), out / "t5", plan["lm"], lr=1e-3)
        s2t5 = stage(Stage2Task(d, spec5, lm5, s1), out / "stage2-t5", plan["stage2"], eval_every=ev, lr=2e-3)
        report["test_t5"] = score(d, None, s2t5)
    report["recipe_seconds"] = round(time.time() - t_start, 1)
    report["recipe_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    report["timings_s"] = timings
    (out / "report.json").write_text(json.dumps(report, indent=2))  # the main numbers, before the extras
    if ablations:
        a1 = stage(Stage2Task(d, spec, opt, None, vision), out / "ablation-stage2-without-stage1",
                   plan["stage2"], eval_every=ev, lr=2e-3)
        a2s1 = stage(Stage1Task(d, spec, vision, ("itc", "itm")), out / "ablation-stage1-without-itg",
                     plan["stage1"], eval_every=ev, lr=1e-3)
        a2s2 = stage(Stage2Task(d, spec, opt, a2s1), out / "ablation-stage1-without-itg-stage2",
                     plan["stage2"], eval_every=ev, lr=2e-3)
        report["ablations"] = {"stage2_without_stage1": score(d, None, a1),
                               "stage1_without_itg": score(d, a2s1, a2s2)}
    if capfilt:

        noisy = out / "capfilt" / "train_noisy.jsonl"
        noisy.parent.mkdir(parents=True, exist_ok=True)
        recs = corrupt_captions(read_jsonl(data_dir / "train.jsonl")[:2000], 0.3, seed=1)
        atomic_write_text(noisy, "".join(json.dumps(r) + "\n" for r in recs))
        t = time.time()
        report["capfilt"] = run_capfilt(d, noisy, s2, s1, out / "capfilt" / "train_clean.jsonl")
        timings["capfilt"] = round(time.time() - t, 1)
    report["timings_s"] = timings
    report["total_seconds"] = round(time.time() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def publish_demo(stage2_dir: str | Path, data_dir: str | Path, dest: str | Path, images: str | Path,
                 n_images: int = 6) -> dict:
    """Copy a trained stage-2 folder to ``dest`` (the exporter's embedded demo model) and ``n_images`` test
    images to ``images``, with their reference and generated captions in ``images/captions.json``."""
    import shutil


    stage2_dir = Path(stage2_dir)
    keep = [p for p in stage2_dir.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in keep)
    if size > 20 * 2**20:

        raise Blip2Error(f"{stage2_dir} is {size / 2**20:.1f} MB; the embedded demo model must be <= 20 MB")
    with atomic_directory(dest, force=True) as tmp:
        for p in keep:
            shutil.copy2(p, tmp / p.name)
    blip, tok, proc = load_checkpoint(dest)
    recs, px = data.load_split(data_dir, "test", proc.size["height"], n_images)
    preds = generate_captions(blip, tok, px)
    with atomic_directory(images, force=True) as tmp:
        rows = []
        for i, (r, p) in enumerate(zip(recs, preds)):
            name = f"sample_{i}.png"
            shutil.copy2(Path(data_dir) / r["image"], tmp / name)
            rows.append({"image": name, "reference": r["caption"], "generated": p})
        (tmp / "captions.json").write_text(json.dumps(rows, indent=2) + "\n")
    return {"demo_model": str(dest), "bytes": size, "samples": rows}
