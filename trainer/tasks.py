"""Stage 1 and stage 2 as tasks for the loop in ``trainer/train.py``."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blip2_export.modelzoo import ModelSpec
from runtime.errors import Blip2Error
from trainer import data, evaluate
from trainer.models import (
    Stage1,
    Stage2,
    generate_captions,
    load_llm,
    load_vision,
    make_tokenizer,
    spec_to_json,
    tokenize,
)


@functools.lru_cache(maxsize=8)
def cached_split(data_dir: str, split: str, image_size: int, limit: int | None = None):
    return data.load_split(data_dir, split, image_size, limit)


def eval_split(data_dir: str, split: str, image_size: int, limit: int | None):
    """``(records, pixels)`` of the eval split, or ``None`` when it is missing or empty (no eval then)."""
    f = Path(data_dir) / f"{split}.jsonl"
    if not limit or not f.is_file() or not f.read_text().strip():
        return None
    return cached_split(str(data_dir), split, image_size, limit)


def tokenizer_words(data_dir: str | Path) -> list[str]:
    return data.dataset_vocabulary(data_dir)


@dataclass
class Stage1Task:
    """ITC + ITM + ITG on a frozen vision model; evaluates retrieval R@1 on ``eval_split``."""

    data_dir: str
    spec: ModelSpec
    vision_dir: str | None = None  # None: a random frozen vision model (tests, ablations)
    objectives: tuple[str, ...] = ("itc", "itm", "itg")
    qformer_init: str | None = None  # a local BERT-style folder
    eval_split: str = "val"
    eval_limit: int = 200
    train_limit: int | None = None
    seed: int = 0
    name: str = "stage1"
    n_train: int = field(init=False)

    def __post_init__(self):
        self.tokenizer = make_tokenizer(tokenizer_words(self.data_dir), "qformer")
        self.records, self.pixels = cached_split(str(self.data_dir), "train", self.spec.image_size,
                                                 self.train_limit)
        self.ids, self.att = tokenize(self.tokenizer, [r["caption"] for r in self.records])
        self.n_train = len(self.records)

    def describe(self) -> dict:
        return {"task": self.name, "spec": spec_to_json(self.spec), "vision": self.vision_dir,
                "objectives": list(self.objectives), "qformer_init": self.qformer_init, "data": self.data_dir,
                "train_limit": self.train_limit, "seed": self.seed}

    def build(self) -> Stage1:
        model = Stage1(self.spec, self.tokenizer, self.objectives, seed=self.seed)
        if self.vision_dir:
            model.load_vision_from(load_vision(self.vision_dir))
        if self.qformer_init:
            model.init_qformer_from_bert(self.qformer_init)
        return model

    def batch(self, indices: torch.Tensor, step: int) -> dict:
        return {"pixel_values": self.pixels[indices], "input_ids": self.ids[indices],
                "attention_mask": self.att[indices]}

    def evaluate(self, model: Stage1) -> dict[str, float]:
        split = eval_split(self.data_dir, self.eval_split, self.spec.image_size, self.eval_limit)
        if split is None:
            return {}
        recs, px = split
        caps = [r["caption"] for r in recs]
        ids, att = tokenize(self.tokenizer, caps)
        return evaluate.retrieval_scores(model, caps, px, ids, att, candidates=min(100, len(caps)))

    def save(self, model: Stage1, folder: Path) -> None:
        model.save(folder)


@dataclass
class Stage2Task:
    """Q-Former -> projection -> frozen LLM. ``stage1_dir=None`` trains the Q-Former from scratch (ablation)."""

    data_dir: str
    spec: ModelSpec
    llm_dir: str
    stage1_dir: str | None = None
    vision_dir: str | None = None  # used when stage1_dir is None
    eval_split: str = "val"
    eval_limit: int = 100
    train_limit: int | None = None
    seed: int = 0
    name: str = "stage2"
    n_train: int = field(init=False)

    def __post_init__(self):
        from transformers import AutoTokenizer

        if not Path(self.llm_dir, "config.json").is_file():
            raise Blip2Error(f"{self.llm_dir} is not a language-model folder",
                             hint="train one with `blip2-train unimodal`")
        self.tokenizer = AutoTokenizer.from_pretrained(self.llm_dir)
        self.records, self.pixels = cached_split(str(self.data_dir), "train", self.spec.image_size,
                                                 self.train_limit)
        self.ids, self.att = tokenize(self.tokenizer, [r["caption"] for r in self.records], eos=True)
        self.n_train = len(self.records)

    def describe(self) -> dict:
        return {"task": self.name, "spec": spec_to_json(self.spec), "llm": self.llm_dir, "stage1": self.stage1_dir,
                "vision": self.vision_dir, "data": self.data_dir, "train_limit": self.train_limit, "seed": self.seed}

    def build(self) -> Stage2:
        model = Stage2(self.spec, self.tokenizer, seed=self.seed)
        vision = load_vision(self.vision_dir) if (self.stage1_dir is None and self.vision_dir) else None
        model.load_parts(self.stage1_dir, load_llm(self.llm_dir), vision)
        return model

    def batch(self, indices: torch.Tensor, step: int) -> dict:
        b = {"pixel_values": self.pixels[indices], "input_ids": self.ids[indices],
             "attention_mask": self.att[indices]}
        if self.spec.llm == "t5":
            b["split"] = (indices * 7919 + step * 104729 + self.seed) % 1000  # per-sample, rank-independent
        return b

    def evaluate(self, model: Stage2) -> dict[str, float]:
        split = eval_split(self.data_dir, self.eval_split, self.spec.image_size, self.eval_limit)
        if split is None:
            return {}
        recs, px = split
        preds = model_captions(model.blip, self.tokenizer, px)
        return evaluate.caption_scores(preds, [r["caption"] for r in recs])

    def save(self, model: Stage2, folder: Path) -> None:
        model.save(folder)


def model_captions(blip, tokenizer, pixel_values) -> list[str]:

    blip.eval()
    return generate_captions(blip, tokenizer, pixel_values)
