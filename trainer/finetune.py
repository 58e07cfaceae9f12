"""Fine-tune a BLIP-2 checkpoint on your own images: captions or questions, as LAVIS fine-tunes BLIP-2.

``--init`` is any checkpoint ``blip2-export export`` accepts (a published one copied to disk or ours, OPT
or Flan-T5); ``--data`` a folder with ``train.jsonl`` (and optionally ``val.jsonl``, scored during and
after training) of ``{"image", "caption"}`` or ``{"image", "question", "answer"}`` records over image
files of any size and format, preprocessed by the checkpoint's own image processor.

As in LAVIS: the ViT and the LLM are frozen, the Q-Former (with its queries) and the projection are trained
(``train_part="projection"``: the projection only; ``unfreeze_vision_blocks``: also the last ViT blocks);
the LLM sees ``[query outputs ; prompt ; target]`` with the prompt ``a photo of`` for captions and
``Question: {} Answer:`` for questions. OPT: LM loss on the target tokens (the prompt is not a target),
ended by the checkpoint's eos. Flan-T5: the prompt goes to the encoder after the queries, the target is
the decoder's. The result is written in the input's own layout (its config, tokenizer and processor files,
its weight dtype and sharding) and exports as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_export.export import generation_ids
from blip2_export.modelzoo import (
    load_checkpoint,
    save_tokenizer,
    standardize_tokenizer_files,
    write_processor_config,
)
from runtime.errors import Blip2Error
from runtime.preprocess import load_image
from trainer import losses
from trainer.dataset_check import DatasetReport, Sample, check_jsonl

TRAIN_PARTS = ("qformer", "projection")
FINETUNE_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    init: str
    data: str
    train_part: str = "qformer"  # qformer: Q-Former + queries + projection; projection: the projection only
    unfreeze_vision_blocks: int = 0  # also train the last N ViT blocks (and the ViT's final norm)
    grad_checkpointing: bool = False
    caption_prompt: str = "a photo of"
    vqa_prompt: str = "Question: {} Answer:"
    skip_bad: bool = False
    max_target_tokens: int = 32
    eval_split: str = "val"
    eval_limit: int = 200
    max_new_tokens: int = 12
    cache_mb: int = 1024  # preprocessed images kept in memory (the rest are read again each time)
    seed: int = 0

    def validate(self) -> None:
        init = Path(self.init)
        if not (init / "config.json").is_file():
            raise Blip2Error(f"--init {self.init}: no config.json there",
                             hint="point --init at a BLIP-2 checkpoint folder (transformers layout)")
        if not (Path(self.data) / "train.jsonl").is_file():
            raise Blip2Error(f"--data {self.data}: no train.jsonl there",
                             hint="put {'image', 'caption'} or {'image', 'question', 'answer'} records in "
                                  "DATA/train.jsonl (images relative to DATA)")
        if self.train_part not in TRAIN_PARTS:
            raise Blip2Error(f"--train-part {self.train_part!r}: choose one of {', '.join(TRAIN_PARTS)}")
        if self.unfreeze_vision_blocks < 0:
            raise Blip2Error(f"--unfreeze-vision-blocks must be >= 0 (got {self.unfreeze_vision_blocks})")
        if self.vqa_prompt.count("{}") != 1:
            raise Blip2Error(f"--vqa-prompt {self.vqa_prompt!r} must contain '{{}}' once (the question)")
        if self.max_target_tokens < 2:
            raise Blip2Error(f"--max-target-tokens must be >= 2 (got {self.max_target_tokens})")
        if self.max_new_tokens < 1:
            raise Blip2Error(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")

    def prompt(self, s: Sample) -> str:
        return self.vqa_prompt.format(s.question) if s.kind == "vqa" else self.caption_prompt


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def _no_dropout(module: nn.Module) -> None:
    """Zero every dropout rate of a frozen part, so it computes the same in train mode as in eval mode."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "dropout_rate"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


class FinetuneModel(nn.Module):
    """A loaded ``Blip2ForConditionalGeneration`` with the LAVIS freezing; ``forward`` returns the LM loss.

    Its ``state_dict`` holds only the trained tensors (a resume checkpoint of a 2.7B model stays small);
    the frozen ones are read from ``--init`` again.
    """

    def __init__(self, blip, cfg: FinetuneConfig):
        super().__init__()
        self.blip, self.cfg = blip, cfg
        self.decoder_only = bool(blip.config.use_decoder_only_language_model)
        self.Q = int(blip.config.num_query_tokens)
        self.image_id = int(blip.config.image_token_index)
        blip.requires_grad_(False)
        trained: list[nn.Module | nn.Parameter] = [blip.language_projection]
        if cfg.train_part == "qformer":
            trained += [blip.qformer, blip.query_tokens]
        layers = blip.vision_model.encoder.layers
        n = cfg.unfreeze_vision_blocks
        if n > len(layers):
            raise Blip2Error(f"--unfreeze-vision-blocks {n}: the ViT has only {len(layers)} blocks")
        if n:
            trained += [*layers[len(layers) - n:], blip.vision_model.post_layernorm]
        for t in trained:
            t.requires_grad_(True)
        self.trained_names = [k for k, p in self.named_parameters() if p.requires_grad]
        # frozen parts run without dropout (as in eval mode) even where gradient checkpointing needs
        # transformers' train mode to recompute them
        _no_dropout(blip.language_model)
        _no_dropout(blip.vision_model)
        if cfg.train_part == "projection":
            _no_dropout(blip.qformer)
        if cfg.grad_checkpointing:
            blip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.step = 0

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = {prefix + k for k in self.trained_names}
        return type(full)((k, v) for k, v in full.items() if k in keep)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        got, want = set(state_dict), set(self.trained_names)
        if strict and got != want:
            raise Blip2Error(f"the checkpoint holds other trained tensors than this run trains "
                             f"({len(got - want)} extra, {len(want - got)} missing)",
                             hint="resume with the same --train-part / --unfreeze-vision-blocks, or a new --out")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.grad_checkpointing:  # frozen parts in eval mode; with checkpointing, dropout is 0
            self.blip.language_model.eval()
            if not self.cfg.unfreeze_vision_blocks:
                self.blip.vision_model.eval()
        return self

    def forward(self, pixel_values, input_ids, attention_mask, labels, decoder_input_ids=None,
                decoder_attention_mask=None):
        B = input_ids.shape[0]
        img = torch.full((B, self.Q), self.image_id, dtype=input_ids.dtype, device=input_ids.device)
        inp = torch.cat([img, input_ids], 1)
        mask = torch.cat([torch.ones_like(img), attention_mask], 1)
        if self.decoder_only:
            logits = self.blip(pixel_values=pixel_values, input_ids=inp, attention_mask=mask).logits
            logits, labels = logits[:, self.Q:-1], labels[:, 1:]
        else:
            logits = self.blip(pixel_values=pixel_values, input_ids=inp, attention_mask=mask,
                               decoder_input_ids=decoder_input_ids,
                               decoder_attention_mask=decoder_attention_mask).logits
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=-100, reduction="sum")
        loss = losses.token_mean(total, (labels != -100).sum())
        return loss, {"lm": loss.detach()}


@dataclass
class FinetuneTask:
    """The task the loop in ``trainer/train.py`` runs for ``blip2-train finetune``."""

    cfg: FinetuneConfig
    report: DatasetReport | None = None  # the train.jsonl check (run by the CLI first, to print it)
    name: str = "finetune"
    n_train: int = field(init=False)

    def __post_init__(self):

        self.cfg.validate()
        self.report = self.report or check_jsonl(Path(self.cfg.data) / "train.jsonl")
        if self.report.problems and not self.cfg.skip_bad:
            raise Blip2Error(self.report.summary(), hint="fix those records, or pass --skip-bad to train without them")
        self.samples = self.report.samples
        if not self.samples:
            raise Blip2Error(f"{self.report.file} has no usable records")
        self.n_train = len(self.samples)
        self.blip, self.tokenizer, self.processor = load_checkpoint(self.cfg.init)
        self.ids = generation_ids(self.blip, self.tokenizer)
        self.decoder_only = bool(self.blip.config.use_decoder_only_language_model)
        size = self.processor.size
        px = 3 * int(size.get("height", 224)) * int(size.get("width", 224)) * 4
        self._cache_max = max(0, self.cfg.cache_mb * 2**20 // px)
        self._cache: dict[Path, torch.Tensor] = {}
        self.encoded = [self._encode(s) for s in self.samples]

    # -- data ---------------------------------------------------------------------------------------
    def _encode(self, s: Sample) -> dict:
        """Token ids of one sample: OPT ``prompt target eos`` (prompt masked); T5 prompt -> encoder."""
        tok, prompt, limit = self.tokenizer, self.cfg.prompt(s), self.cfg.max_target_tokens
        eos = self.ids["eos"][0]
        if self.decoder_only:
            p_ids = tok(prompt).input_ids
            full = tok(f"{prompt} {s.target}" if prompt else s.target).input_ids
            target = full[len(p_ids):][: limit - 1]
            if not target or target[-1] != eos:
                target = target + [eos]
            return {"ids": p_ids + target, "n_prompt": len(p_ids)}
        target = tok(s.target).input_ids[:limit]
        if target[-1] != eos:
            target = target[:-1] + [eos] if len(target) == limit else target + [eos]
        return {"ids": tok(prompt).input_ids, "target": target}

    def pixels(self, paths: list[Path]) -> torch.Tensor:

        todo = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if todo:
            px = self.processor([load_image(p) for p in todo], return_tensors="pt")["pixel_values"].float()
            fresh = dict(zip(todo, px))
            for p, t in fresh.items():
                if len(self._cache) < self._cache_max:
                    self._cache[p] = t
        else:
            fresh = {}
        return torch.stack([self._cache[p] if p in self._cache else fresh[p] for p in paths])

    def batch(self, indices: torch.Tensor, step: int) -> dict:
        rows = [self.encoded[i] for i in indices.tolist()]
        pad = self.ids["pad"]
        b = {"pixel_values": self.pixels([self.samples[i].image for i in indices.tolist()])}
        T = max(len(r["ids"]) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        att = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["ids"])] = torch.tensor(r["ids"])
            att[i, : len(r["ids"])] = 1
        b["input_ids"], b["attention_mask"] = ids, att
        if self.decoder_only:
            labels = ids.masked_fill(att == 0, -100)
            for i, r in enumerate(rows):
                labels[i, : r["n_prompt"]] = -100
            b["labels"] = labels
            return b
        L = max(len(r["target"]) for r in rows)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["target"])] = torch.tensor(r["target"])
        start = torch.full((len(rows), 1), self.ids["decoder_start"], dtype=torch.long)
        b["decoder_input_ids"] = torch.cat([start, labels[:, :-1].masked_fill(labels[:, :-1] < 0, pad)], 1)
        b["decoder_attention_mask"] = torch.cat([torch.ones_like(start), (labels[:, :-1] >= 0).long()], 1)
        b["labels"] = labels
        return b

    # -- the loop's hooks -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"task": self.name, **{k: v for k, v in asdict(self.cfg).items() if k not in ("cache_mb",)},
                "n_train": self.n_train}

    def build(self) -> FinetuneModel:
        return FinetuneModel(self.blip, self.cfg)

    def eval_samples(self) -> list[Sample]:
        f = Path(self.cfg.data) / f"{self.cfg.eval_split}.jsonl"
        if not self.cfg.eval_limit or not f.is_file():
            return []
        if not hasattr(self, "_eval"):
            rep = check_jsonl(f, limit=self.cfg.eval_limit)
            self._eval = rep.samples
        return self._eval

    def evaluate(self, model: FinetuneModel) -> dict[str, float]:
        samples = self.eval_samples()
        if not samples:
            return {}
        return answer_scores(generate_answers(model.blip, self.tokenizer, self.processor, samples, self.cfg,
                                              self.ids), samples)

    def save(self, model: FinetuneModel, folder: Path) -> None:
        save_like_input(model.blip, self.tokenizer, Path(self.cfg.init), folder,
                        {"finetune": self.describe()})


# -------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def generate_answers(blip, tokenizer, processor, samples: list[Sample], cfg: FinetuneConfig, ids: dict,
                     batch_size: int = 64) -> list[str]:
    """Greedy outputs for ``samples`` with their prompts, in batches of equal prompt length (no padding)."""

    blip.eval()
    device = blip.device
    Q, image_id = blip.config.num_query_tokens, blip.config.image_token_index
    prompts = [tokenizer(cfg.prompt(s)).input_ids for s in samples]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(samples)
    special = {"eos_token_id": list(ids["eos"]), "pad_token_id": ids["pad"]}
    if ids["decoder_start"] is not None:
        special["decoder_start_token_id"] = ids["decoder_start"]
    for idx in groups.values():
        for c in range(0, len(idx), batch_size):
            chunk = idx[c:c + batch_size]
            px = processor([load_image(samples[i].image) for i in chunk], return_tensors="pt")["pixel_values"]
            inp = torch.tensor([[image_id] * Q + prompts[i] for i in chunk], device=device)
            gen = blip.generate(pixel_values=px.float().to(device), input_ids=inp, attention_mask=torch.ones_like(inp),
                                max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1, **special)
            if blip.config.use_decoder_only_language_model:
                gen = gen[:, inp.shape[1]:]
            for i, text in zip(chunk, tokenizer.batch_decode(gen.cpu(), skip_special_tokens=True)):
                out[i] = " ".join(text.split())
    return out


def answer_scores(predicted: list[str], samples: list[Sample]) -> dict[str, float]:
    """``exact_match`` over all samples, and per task (``exact_match_caption`` / ``exact_match_vqa``)."""
    hits = [normalize_answer(p) == normalize_answer(s.target) for p, s in zip(predicted, samples)]
    scores = {"exact_match": sum(hits) / len(hits)}
    for kind in ("caption", "vqa"):
        k = [h for h, s in zip(hits, samples) if s.kind == kind]
        if k and len(k) < len(hits):
            scores[f"exact_match_{kind}"] = sum(k) / len(k)
    return scores


def _weights_layout(folder: Path) -> tuple[torch.dtype, str | None]:
    """The floating dtype of the input's weights and, when sharded, a shard size that keeps it sharded."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:  # *.bin: save as safetensors in fp32
        return torch.float32, None
    dtypes: dict[torch.dtype, int] = {}
    with safe_open(str(files[0]), framework="pt") as f:
        for k in list(f.keys())[:64]:
            t = f.get_slice(k).get_dtype()
            d = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t)
            if d is not None:
                dtypes[d] = dtypes.get(d, 0) + 1
    dtype = max(dtypes, key=dtypes.get) if dtypes else torch.float32
    shard = None
    if (folder / "model.safetensors.index.json").is_file():
        shard = f"{max(f.stat().st_size for f in files) // 2**20 + 1}MB"
    return dtype, shard


def save_like_input(blip, tokenizer, init: Path, folder: Path, meta: dict) -> None:
    """Write ``blip`` to ``folder`` in the layout of the checkpoint ``init``: its non-weight files as they
    are (tokenizer files made loadable by ``Blip2Processor``), the weights in its dtype and sharding."""

    dtype, shard = _weights_layout(init)
    for p in init.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".pt")):
            shutil.copy2(p, folder / p.name)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in blip.state_dict().items()}
    kw = {"max_shard_size": shard} if shard else {}
    blip.save_pretrained(folder, state_dict=state, **kw)
    if len(tokenizer) != _saved_vocab(folder):  # load_checkpoint added <image> to an old tokenizer
        save_tokenizer(tokenizer, folder)
    standardize_tokenizer_files(folder)
    if not (folder / "processor_config.json").is_file():
        write_processor_config(folder, blip.config.num_query_tokens)
    (folder / FINETUNE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _saved_vocab(folder: Path) -> int:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(folder))
    except Exception:  # noqa: BLE001 - no loadable tokenizer in the input: write ours
        return -1
