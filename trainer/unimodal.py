"""Short unimodal pre-training of the models BLIP-2 keeps frozen, so they carry knowledge as in the paper.

* vision: the ``Blip2VisionModel`` ViT learns the scene attributes from images (one linear head per
  attribute on the [CLS] output, like supervised ImageNet pre-training); the heads are dropped after.
* ``opt``: an OPT-style decoder learns the caption language (next-token LM).
* ``t5``: a T5-style encoder-decoder learns it as a prefix LM (prefix to the encoder, rest decoded).

Each writes a transformers folder (``from_pretrained``) that stage 1 / stage 2 load and freeze.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_export.modelzoo import ModelSpec, make_config, make_image_processor, save_tokenizer
from runtime.errors import Blip2Error
from trainer import data, losses
from trainer.models import build_vision, init_weights, make_tokenizer, spec_to_json, tokenize
from trainer.tasks import cached_split, eval_split, tokenizer_words


class VisionPretrain(nn.Module):
    def __init__(self, spec: ModelSpec, tokenizer):
        super().__init__()
        self.vision = build_vision(spec, tokenizer)
        self.heads = nn.ModuleDict({a: nn.Linear(spec.vision_hidden, len(v))
                                    for a, v in data.ATTRIBUTE_VALUES.items()})
        init_weights(self.heads)

    def forward(self, pixel_values, labels):
        h = self.vision(pixel_values=pixel_values).last_hidden_state[:, 0]
        loss, metrics = 0.0, {}
        for i, (name, head) in enumerate(self.heads.items()):
            logits = head(h).float()
            loss = loss + F.cross_entropy(logits, labels[:, i])
            metrics[f"acc_{name}"] = (logits.argmax(-1) == labels[:, i]).float().mean()
        return loss, metrics


@dataclass
class VisionTask:
    data_dir: str
    spec: ModelSpec
    eval_limit: int = 500
    train_limit: int | None = None
    seed: int = 0
    name: str = "vision"
    n_train: int = field(init=False)

    def __post_init__(self):
        self.tokenizer = make_tokenizer(tokenizer_words(self.data_dir), "opt")
        self.records, self.pixels = cached_split(str(self.data_dir), "train", self.spec.image_size,
                                                 self.train_limit)
        self.labels = attribute_labels(self.records)
        self.n_train = len(self.records)

    def describe(self):
        return {"task": self.name, "spec": spec_to_json(self.spec), "data": self.data_dir,
                "train_limit": self.train_limit, "seed": self.seed}

    def build(self):
        torch.manual_seed(self.seed)
        return VisionPretrain(self.spec, self.tokenizer)

    def batch(self, indices, step):
        return {"pixel_values": self.pixels[indices], "labels": self.labels[indices]}

    def evaluate(self, model):
        split = eval_split(self.data_dir, "val", self.spec.image_size, self.eval_limit)
        if split is None:
            return {}
        recs, px = split
        dev = next(model.parameters()).device
        _, metrics = model(px.to(dev), attribute_labels(recs).to(dev))
        return {k: float(v) for k, v in metrics.items()}

    def save(self, model, folder):
        model.vision.save_pretrained(folder)
        make_image_processor(self.spec).save_pretrained(folder)


def attribute_labels(records) -> torch.Tensor:
    try:
        return torch.tensor([[data.ATTRIBUTE_VALUES[a].index(r[a]) for a in data.ATTRIBUTE_VALUES]
                             for r in records])
    except (KeyError, ValueError) as e:
        raise Blip2Error(f"vision pre-training needs the synthetic attribute labels in the JSONL ({e})",
                         hint="for your own data, pass an already trained vision model with --vision") from None


class CausalLM(nn.Module):
    """Next-token LM on captions behind a soft prefix of ``prefix`` vectors.

    In BLIP-2 the frozen decoder reads 32 visual tokens before the text, so its learned positions 32+
    must be trained and it must be able to use a soft prefix, as a general LLM uses its context. The
    prefix is random vectors; for half of the captions the embeddings of the caption's own words are
    scattered over it in random order, so the LM learns to read content words from its context.
    """

    def __init__(self, spec, tokenizer, prefix: int | None = None):
        super().__init__()
        from transformers import OPTForCausalLM

        self.lm = OPTForCausalLM(make_config(spec, tokenizer).text_config)
        self.prefix = spec.num_query_tokens if prefix is None else prefix
        self.step = 0

    def forward(self, input_ids, attention_mask, split=None):
        emb = self.lm.get_input_embeddings()(input_ids)
        B, P, dev = input_ids.shape[0], self.prefix, emb.device
        # the draws come from a CPU generator (the same on any device), the tensors then move to the model's
        g = torch.Generator().manual_seed(int(input_ids.sum()) * 1009 + self.step)
        noise = torch.randn(B, P, emb.shape[-1], generator=g).to(dev) * emb.detach().std()
        keyword = torch.rand(B, generator=g) < 0.5
        lengths = attention_mask.sum(1).tolist()
        rows = []
        for b in range(B):
            row = noise[b]
            words = emb[b, 1 : lengths[b] - 1]  # without <s> and </s>
            if keyword[b] and 0 < words.shape[0] <= P:
                slots = torch.randperm(P, generator=g)[: words.shape[0]].to(dev)
                order = torch.randperm(words.shape[0], generator=g).to(dev)
                row = row.index_put((slots,), words[order].float())
            rows.append(row)
        noise = torch.stack(rows)
        mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=dev), attention_mask], 1)
        logits = self.lm(inputs_embeds=torch.cat([noise.to(emb.dtype), emb], 1), attention_mask=mask).logits
        logits = logits[:, P:-1]
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return loss, {}


class PrefixLM(nn.Module):
    def __init__(self, spec, tokenizer):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        self.tokenizer = tokenizer
        self.lm = T5ForConditionalGeneration(make_config(spec, tokenizer).text_config)

    def forward(self, input_ids, attention_mask, split=None):
        tok = self.tokenizer
        enc, enc_att, labels = losses.prefix_split(input_ids, attention_mask, split, tok.eos_token_id,
                                                   tok.pad_token_id)
        out = self.lm(input_ids=enc, attention_mask=enc_att, labels=labels)
        return out.loss, {}


@dataclass
class TextTask:
    """Language-model pre-training on the training captions; ``llm`` is ``opt`` or ``t5``."""

    data_dir: str
    spec: ModelSpec
    seed: int = 0
    name: str = "text"
    n_train: int = field(init=False)

    def __post_init__(self):
        self.tokenizer = make_tokenizer(tokenizer_words(self.data_dir), self.spec.llm)
        records = data.read_jsonl(Path(self.data_dir) / "train.jsonl")
        self.ids, self.att = tokenize(self.tokenizer, [r["caption"] for r in records], eos=True)
        val = Path(self.data_dir) / "val.jsonl"
        self.val = [r["caption"] for r in data.read_jsonl(val)[:200]] if val.is_file() else []
        self.n_train = len(records)
        self.name = f"lm-{self.spec.llm}"

    def describe(self):
        return {"task": self.name, "spec": spec_to_json(self.spec), "data": self.data_dir, "seed": self.seed}

    def build(self):
        torch.manual_seed(self.seed)
        return CausalLM(self.spec, self.tokenizer) if self.spec.llm == "opt" else PrefixLM(self.spec, self.tokenizer)

    def batch(self, indices, step):
        b = {"input_ids": self.ids[indices], "attention_mask": self.att[indices]}
        if self.spec.llm == "t5":
            b["split"] = (indices * 7919 + step * 104729 + self.seed) % 1000
        return b

    def evaluate(self, model):
        if not self.val:
            return {}
        ids, att = tokenize(self.tokenizer, self.val, eos=True)
        split = torch.arange(len(self.val)) * 2  # even: no prefix, plain caption LM
        dev = next(model.parameters()).device
        loss, _ = model(ids.to(dev), att.to(dev), split)
        return {"val_loss": float(loss), "val_ppl": float(torch.exp(loss))}

    def save(self, model, folder):

        model.lm.save_pretrained(folder)
        save_tokenizer(self.tokenizer, folder)
        (Path(folder) / "trainer_spec.json").write_text(json.dumps({"llm": self.spec.llm}))


