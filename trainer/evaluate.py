"""The numbers a user cares about: retrieval R@1 among 100 candidates, caption exact match and attributes.

Retrieval follows BLIP-2: rank by ITC similarity (max over queries), optionally re-rank the top k with
the ITM head. With 100 candidates per chunk, a hit is a retrieved caption (image->text) or image
(text->image) whose caption equals the ground truth, so two test images with the same caption do
not count against the model. Caption scores parse the synthetic template back into its attributes.
"""

from __future__ import annotations

import re

import torch

from trainer.data import ATTRIBUTES, COLOURS, COUNTS, POSITION_PHRASE, SHAPES, SIZES

_POS = {v: k for k, v in POSITION_PHRASE.items()}
_CAPTION = re.compile(
    rf"^({'|'.join(COUNTS.values())}) ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) "
    rf"({'|'.join(SHAPES)})s? ({'|'.join(POSITION_PHRASE.values())})$")


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named in a caption; a word that is missing or unknown gives ``None`` for its attribute."""
    text = " ".join(text.lower().split())
    m = _CAPTION.match(text)
    if m:
        return dict(zip(ATTRIBUTES, (m[1], m[2], m[3], m[4], _POS[m[5]])))
    words = text.split()
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    found["count"] = words[0] if words and words[0] in COUNTS.values() else None
    found["size"] = next((w for w in words if w in SIZES), None)
    found["colour"] = next((w for w in words if w in COLOURS), None)
    found["shape"] = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), None)
    found["position"] = next((k for k, v in POSITION_PHRASE.items() if v in text), None)
    return found


def caption_scores(predicted: list[str], references: list[str]) -> dict[str, float]:
    """exact_match, per-attribute accuracy and ``all_attributes`` (every attribute word right)."""
    n = len(references)
    exact = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predicted, references)) / n
    scores = {"exact_match": exact}
    per = {a: 0 for a in ATTRIBUTES}
    all_ok = 0
    for p, r in zip(predicted, references):
        pp, rr = parse_caption(p), parse_caption(r)
        ok = [pp[a] == rr[a] for a in ATTRIBUTES]
        for a, good in zip(ATTRIBUTES, ok):
            per[a] += good
        all_ok += all(ok)
    scores["all_attributes"] = all_ok / n
    scores.update({f"acc_{a}": per[a] / n for a in ATTRIBUTES})
    scores["min_attribute_acc"] = min(per[a] / n for a in ATTRIBUTES)
    return scores


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def stage1_features(stage1, pixel_values, input_ids, attention_mask, batch_size: int = 250):
    """Image embeddings, query features and text features, computed on the model's device, returned on the CPU."""
    dev = _device(stage1)
    embeds, img, txt = [], [], []
    for i in range(0, pixel_values.shape[0], batch_size):
        e = stage1.image_embeds(pixel_values[i:i + batch_size].to(dev))
        embeds.append(e.cpu())
        img.append(stage1.query_features(e).cpu())
        txt.append(stage1.text_features(input_ids[i:i + batch_size].to(dev),
                                        attention_mask[i:i + batch_size].to(dev)).cpu())
    return torch.cat(embeds), torch.cat(img), torch.cat(txt)


@torch.no_grad()
def itm_scores(stage1, image_embeds, input_ids, attention_mask, batch_size: int = 250) -> torch.Tensor:
    """P(match) for aligned rows of images and texts (on the CPU; the model runs on its device)."""
    dev = _device(stage1)
    out = []
    for i in range(0, image_embeds.shape[0], batch_size):
        logits = stage1.itm_logits(image_embeds[i:i + batch_size].to(dev), input_ids[i:i + batch_size].to(dev),
                                   attention_mask[i:i + batch_size].to(dev))
        out.append(logits.float().softmax(-1)[:, 1].cpu())
    return torch.cat(out)


@torch.no_grad()
def retrieval_scores(stage1, captions: list[str], pixel_values, input_ids, attention_mask,
                     candidates: int = 100, rerank_k: int = 0) -> dict[str, float]:
    """Mean R@1 over consecutive chunks of ``candidates`` test pairs, both directions."""
    stage1.eval()
    embeds, img, txt = stage1_features(stage1, pixel_values, input_ids, attention_mask)
    n = (len(captions) // candidates) * candidates
    if n == 0:
        candidates = n = len(captions)
    hits = {"i2t_r1": 0, "t2i_r1": 0}
    if rerank_k:
        hits |= {"i2t_r1_itm": 0, "t2i_r1_itm": 0}
    for c in range(0, n, candidates):
        sl = slice(c, c + candidates)
        caps = captions[sl]
        sim = torch.einsum("iqd,td->itq", img[sl], txt[sl]).max(-1).values  # [images, texts]
        same = torch.tensor([[a == b for b in caps] for a in caps])
        i2t, t2i = sim.argmax(1), sim.argmax(0)
        hits["i2t_r1"] += int(same[torch.arange(len(caps)), i2t].sum())
        hits["t2i_r1"] += int(same[t2i, torch.arange(len(caps))].sum())
        if rerank_k:
            k = min(rerank_k, len(caps))
            for i in range(len(caps)):  # image -> text: re-rank the top k texts with ITM
                top = sim[i].topk(k).indices
                s = itm_scores(stage1, embeds[sl][i:i + 1].expand(k, -1, -1), input_ids[sl][top],
                               attention_mask[sl][top])
                hits["i2t_r1_itm"] += int(same[i, top[s.argmax()]])
            for t in range(len(caps)):
                top = sim[:, t].topk(k).indices
                s = itm_scores(stage1, embeds[sl][top], input_ids[sl][t:t + 1].expand(k, -1),
                               attention_mask[sl][t:t + 1].expand(k, -1))
                hits["t2i_r1_itm"] += int(same[top[s.argmax()], t])
    return {k: v / n for k, v in hits.items()}
