"""``blip2-train``: the BLIP-2 trainer's command line.

The offline recipe in one command:

\b
    blip2-train recipe runs/recipe            # data -> unimodal -> stage 1 -> stage 2 -> test scores

or step by step:

\b
    blip2-train data runs/data
    blip2-train unimodal --data runs/data --out runs/uni
    blip2-train stage1 --data runs/data --vision runs/uni/vision/model --out runs/s1
    blip2-train stage2 --data runs/data --llm runs/uni/opt/model --stage1 runs/s1/model --out runs/s2
    blip2-train eval --data runs/data --stage1 runs/s1/model --stage2 runs/s2/model
    blip2-train finetune --init ./blip2-opt-2.7b --data ./my-photos --out runs/ft   # your own data

Every training command runs on the CPU or a GPU (``--device auto|cpu|cuda|cuda:N``), as one process or
under torchrun (DDP over gloo on CPU, NCCL on GPUs), e.g.
``torchrun --nproc_per_node 2 -m trainer.cli stage1 ...``, and continues after a kill with
``--resume latest``.

Each command imports what it runs inside its body (torch, transformers and the trainer modules): the
heavy dependency is torch, and ``blip2-train --help`` should not wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from runtime.errors import Blip2Error


def _spec(llm: str, sizes: tuple[str, ...]):
    from blip2_export.modelzoo import get_spec
    from trainer.models import TRAINER_SPEC

    overrides: dict = {"llm": llm}
    fields = {f.name: f.type for f in dataclasses.fields(TRAINER_SPEC)}
    for item in sizes:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise Blip2Error(f"--size {item!r}: expected NAME=INT with NAME one of "
                             f"{', '.join(k for k in fields if k not in ('llm', 'extra_words'))}")
        overrides[key] = int(value)
    return get_spec(TRAINER_SPEC, **overrides)


def loop_options(f):
    """Options of the training loop, shared by every training command."""
    opts = [
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Run folder: checkpoints/latest.pt, metrics.jsonl, eval.jsonl and the final model/."),
        click.option("--steps", default=300, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", default=64, show_default=True,
                     help="Global micro-batch, split over torchrun processes."),
        click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step."),
        click.option("--lr", default=5e-4, show_default=True, help="Peak learning rate (AdamW)."),
        click.option("--warmup", default=30, show_default=True, help="Linear warmup steps, then cosine decay."),
        click.option("--weight-decay", default=0.05, show_default=True,
                     help="Decoupled weight decay (not on biases, norms, query tokens)."),
        click.option("--clip", default=1.0, show_default=True, help="Gradient-norm clip (0: off)."),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
                     help="auto: bf16 autocast where the GPU has bf16 (Ampere+) or the CPU has bf16 instructions."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                     help="Where to train. auto: cuda when torch sees a GPU, else cpu. Under torchrun each "
                          "process takes cuda:LOCAL_RANK."),
        click.option("--eval-every", default=0, show_default=True, help="Evaluate on val every N steps (0: end only)."),
        click.option("--ckpt-every", default=50, show_default=True, help="Write checkpoints/latest.pt every N steps."),
        click.option("--resume", default=None, help="'latest' (continue this --out after a kill) or a .pt path."),
        click.option("--seed", default=0, show_default=True),
        click.option("--threads", default=1, show_default=True, help="torch threads per process (0: torch default)."),
        click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to metrics.jsonl)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _loop_config(kw: dict):
    """The loop's config from the shared options, validated before the command loads any data or model
    (``--device cuda`` on a machine without CUDA fails here)."""
    from trainer.train import LoopConfig, launch_env

    cfg = LoopConfig(out=kw.pop("out"), steps=kw.pop("steps"), batch_size=kw.pop("batch_size"),
                     grad_accum=kw.pop("grad_accum"), lr=kw.pop("lr"), warmup=kw.pop("warmup"),
                     weight_decay=kw.pop("weight_decay"), clip=kw.pop("clip"), precision=kw.pop("precision"),
                     device=kw.pop("device"), eval_every=kw.pop("eval_every"), ckpt_every=kw.pop("ckpt_every"),
                     resume=kw.pop("resume"), seed=kw.pop("seed"), threads=kw.pop("threads"),
                     progress=not kw.pop("no_progress"))
    _, world, local_rank = launch_env()
    cfg.validate(world, local_rank)
    return cfg


def _run(task, cfg) -> None:
    from trainer.train import cleanup_distributed, train

    try:
        train(task, cfg)
    finally:
        cleanup_distributed()


size_option = click.option("--size", "sizes", multiple=True, metavar="NAME=INT",
                           help="Override a model size, e.g. --size qformer_layers=2 (see trainer.models.TRAINER_SPEC).")


@click.group(help=__doc__)
def cli() -> None:
    pass


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=8000, show_default=True)
@click.option("--val", "n_val", default=500, show_default=True)
@click.option("--test", "n_test", default=500, show_default=True)
@click.option("--image-size", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def data(out, n_train, n_val, n_test, image_size, seed, force):
    """Write the deterministic synthetic image-caption dataset (JSONL + images) to OUT.

    Scenes of 1-3 objects of one colour, shape and size in one region; captions such as
    "two large red circles on the left". The same layout ({split}.jsonl with {"image", "caption"}
    and an image folder) is the format for your own data.
    """
    from trainer.data import generate_dataset

    generate_dataset(out, {"train": n_train, "val": n_val, "test": n_test}, seed=seed, image_size=image_size,
                     force=force)
    click.echo(f"wrote {out}: train={n_train} val={n_val} test={n_test}")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--what", default="vision,opt", show_default=True, help="Comma list of vision, opt, t5.")
@click.option("--vision-steps", default=600, show_default=True)
@click.option("--lm-steps", default=300, show_default=True)
@size_option
@loop_options
def unimodal(data_dir, what, vision_steps, lm_steps, sizes, **kw):
    """Pre-train the frozen unimodal models: a ViT on images, OPT/T5 language models on captions.

    Writes OUT/vision/model, OUT/opt/model, OUT/t5/model (transformers folders).
    """
    from trainer.unimodal import TextTask, VisionTask

    base = Path(kw["out"])
    for part in [w.strip() for w in what.split(",") if w.strip()]:
        if part not in ("vision", "opt", "t5"):
            raise Blip2Error(f"--what {part!r}: choose from vision, opt, t5")
        cfg = _loop_config(dict(kw))
        cfg.out = str(base / part)
        cfg.steps = vision_steps if part == "vision" else lm_steps
        spec = _spec("t5" if part == "t5" else "opt", sizes)
        task = VisionTask(data_dir, spec, seed=cfg.seed) if part == "vision" else TextTask(data_dir, spec, seed=cfg.seed)
        _run(task, cfg)


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--vision", default=None, type=click.Path(exists=True, file_okay=False),
              help="Frozen vision model folder (from `unimodal`); omitted: a random frozen ViT.")
@click.option("--objectives", default="itc,itm,itg", show_default=True, help="Comma list of itc, itm, itg.")
@click.option("--qformer-init", default=None, type=click.Path(exists=True, file_okay=False),
              help="Initialise the Q-Former from a local BERT-style transformers folder.")
@click.option("--train-limit", default=None, type=int, help="Use only the first N training records.")
@size_option
@loop_options
def stage1(data_dir, vision, objectives, qformer_init, train_limit, sizes, **kw):
    """BLIP-2 stage 1: Q-Former representation learning (ITC + ITM + ITG) on a frozen image encoder.

    OUT/model loads with transformers' Blip2ForImageTextRetrieval (ITG head and temperature in
    stage1_extras.safetensors beside it).
    """
    from trainer.tasks import Stage1Task

    cfg = _loop_config(kw)
    objs = tuple(o.strip() for o in objectives.split(",") if o.strip())
    _run(Stage1Task(data_dir, _spec("opt", sizes), vision, objs, qformer_init, train_limit=train_limit,
                    seed=cfg.seed), cfg)


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--llm", required=True, type=click.Path(exists=True, file_okay=False),
              help="Frozen OPT or T5 folder from `unimodal` (its tokenizer is used).")
@click.option("--stage1", "stage1_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Stage-1 model folder; omitted: the Q-Former starts from scratch (ablation).")
@click.option("--vision", default=None, type=click.Path(exists=True, file_okay=False),
              help="Vision folder, only when --stage1 is omitted.")
@click.option("--train-limit", default=None, type=int)
@size_option
@loop_options
def stage2(data_dir, llm, stage1_dir, vision, train_limit, sizes, **kw):
    """BLIP-2 stage 2: generative learning through a frozen OPT (LM loss) or T5 (prefix-LM loss).

    OUT/model loads with Blip2ForConditionalGeneration.from_pretrained and `blip2-export export`.
    """
    from transformers import AutoConfig

    from trainer.tasks import Stage2Task

    cfg = _loop_config(kw)
    kind = "t5" if AutoConfig.from_pretrained(llm).model_type == "t5" else "opt"
    _run(Stage2Task(data_dir, _spec(kind, sizes), llm, stage1_dir, vision, train_limit=train_limit,
                    seed=cfg.seed), cfg)


@cli.command()
@click.option("--init", "init", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint to start from: any folder `blip2-export export` accepts (published or ours, "
                   "OPT or Flan-T5).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with train.jsonl (val.jsonl optional, scored): {'image', 'caption'} or "
                   "{'image', 'question', 'answer'} per line, image paths relative to the folder.")
@click.option("--train-part", type=click.Choice(["qformer", "projection"]), default="qformer", show_default=True,
              help="qformer: Q-Former + queries + projection (LAVIS); projection: the projection only.")
@click.option("--unfreeze-vision-blocks", default=0, show_default=True, help="Also train the last N ViT blocks.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--caption-prompt", default="a photo of", show_default=True)
@click.option("--vqa-prompt", default="Question: {} Answer:", show_default=True)
@click.option("--skip-bad", is_flag=True, help="Train without the records the dataset check reports.")
@click.option("--max-target-tokens", default=32, show_default=True, help="Longest caption / answer (tokens).")
@click.option("--eval-limit", default=200, show_default=True, help="val.jsonl records scored (0: none).")
@click.option("--max-new-tokens", default=12, show_default=True, help="Generation length when scoring.")
@loop_options
def finetune(init, data_dir, train_part, unfreeze_vision_blocks, grad_checkpointing, caption_prompt, vqa_prompt,
             skip_bad, max_target_tokens, eval_limit, max_new_tokens, **kw):
    """Fine-tune a BLIP-2 checkpoint on your own images (captions or questions), LAVIS-style.

    Frozen ViT and LLM; the Q-Former and projection are trained. The dataset is checked first (missing or
    unreadable images, empty texts, duplicates). OUT/model is written in the --init checkpoint's own layout
    and exports as it is.
    """
    from trainer.dataset_check import check_jsonl
    from trainer.finetune import FinetuneConfig, FinetuneTask
    from trainer.train import launch_env

    cfg = _loop_config(kw)
    ft = FinetuneConfig(init=init, data=data_dir, train_part=train_part,
                        unfreeze_vision_blocks=unfreeze_vision_blocks, grad_checkpointing=grad_checkpointing,
                        caption_prompt=caption_prompt, vqa_prompt=vqa_prompt, skip_bad=skip_bad,
                        max_target_tokens=max_target_tokens, eval_limit=eval_limit, max_new_tokens=max_new_tokens,
                        seed=cfg.seed)
    ft.validate()
    report = check_jsonl(Path(data_dir) / "train.jsonl")
    if launch_env()[0] == 0:
        for line in report.lines():
            click.echo(line, err=bool(report.problems))
        if report.problems and skip_bad:
            click.echo(f"--skip-bad: training on the {len(report.samples)} good records", err=True)
    _run(FinetuneTask(ft, report), cfg)


@cli.command("eval")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True)
@click.option("--stage1", "stage1_dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--stage2", "stage2_dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--limit", default=500, show_default=True, help="Test records to use (R@1 among chunks of 100).")
@click.option("--rerank-k", default=0, show_default=True, help="Re-rank ITC's top k with the ITM head.")
@click.option("--threads", default=1, show_default=True)
def eval_cmd(data_dir, split, stage1_dir, stage2_dir, limit, rerank_k, threads):
    """Score models on a split: retrieval R@1 (stage 1), caption exact match and attributes (stage 2)."""
    import torch

    from trainer.recipe import score

    torch.set_num_threads(threads)
    click.echo(json.dumps(score(data_dir, stage1_dir, stage2_dir, split, limit, rerank_k), indent=2))


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder the image paths are relative to.")
@click.option("--jsonl", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Records to clean ({'image', 'caption'} per line).")
@click.option("--captioner", required=True, type=click.Path(exists=True, file_okay=False),
              help="Stage-2 model folder.")
@click.option("--filter", "filter_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Stage-1 model folder (its ITM head filters).")
@click.option("--threshold", default=0.5, show_default=True, help="Keep a pair when P(match) >= this.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--threads", default=1, show_default=True)
def capfilt(data_dir, jsonl, captioner, filter_dir, threshold, out, threads):
    """CapFilt (BLIP): caption the images, keep original and synthetic pairs that pass the ITM filter."""
    import torch

    from trainer.capfilt import capfilt as run

    torch.set_num_threads(threads)
    click.echo(json.dumps(run(data_dir, jsonl, captioner, filter_dir, out, threshold), indent=2))


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="train", show_default=True)
@click.option("--fraction", default=0.3, show_default=True, help="Share of captions to swap for wrong ones.")
@click.option("--limit", default=None, type=int)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def corrupt(data_dir, split, fraction, limit, seed, out):
    """Write a noisy copy of a split: FRACTION of captions swapped, marked "noisy" (to measure CapFilt)."""
    from runtime.integrity import atomic_write_text
    from trainer.capfilt import corrupt_captions
    from trainer.data import read_jsonl

    recs = corrupt_captions(read_jsonl(Path(data_dir) / f"{split}.jsonl")[:limit], fraction, seed)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in recs))
    click.echo(f"wrote {out}: {sum(r['noisy'] for r in recs)} of {len(recs)} captions swapped")


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--t5", is_flag=True, help="Also pre-train a T5 and train stage 2 on it.")
@click.option("--ablations", is_flag=True, help="Also run the ablations (stage 2 without stage 1, stage 1 without ITG).")
@click.option("--capfilt", "with_capfilt", is_flag=True, help="Also measure CapFilt on a 30%-noisy training subset.")
@click.option("--quick", is_flag=True, help="Tiny sizes and few steps: checks the plumbing in about a minute.")
@click.option("--threads", default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the stages train (the test scoring runs on the CPU).")
def recipe(out, t5, ablations, with_capfilt, quick, threads, device):
    """The full offline recipe: data -> unimodal -> stage 1 -> stage 2 -> test scores (OUT/report.json).

    Re-running continues where it stopped: finished stages are kept, a killed one resumes from its
    latest checkpoint.
    """
    from trainer.device import resolve_device
    from trainer.recipe import run_recipe

    resolve_device(device)  # before any stage starts
    report = run_recipe(out, t5=t5, ablations=ablations, capfilt=with_capfilt, quick=quick, threads=threads,
                        device=device)
    click.echo(json.dumps(report, indent=2))


@cli.command("publish-demo")
@click.option("--stage2", "stage2_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dest", default=None, help="Default: blip2_export/assets/demo_model.")
@click.option("--images", default=None, help="Default: blip2_export/assets/sample_images.")
def publish_demo(stage2_dir, data_dir, dest, images):
    """Install a trained stage-2 OPT model as the embedded model that `blip2-export demo` uses."""
    import blip2_export
    from trainer.recipe import publish_demo as run

    assets = Path(blip2_export.__file__).parent / "assets"
    out = run(stage2_dir, data_dir, dest or assets / "demo_model", images or assets / "sample_images")
    click.echo(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="blip2-train", standalone_mode=True)
    except Blip2Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
