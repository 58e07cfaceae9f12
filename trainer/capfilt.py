"""CapFilt (from BLIP): caption images with the stage-2 captioner, keep pairs the stage-1 ITM head accepts.

For every image the captioner writes a synthetic caption; the filter scores both the original caption
and the synthetic one with ITM and keeps each pair whose match probability passes ``threshold``. The
output is a cleaned JSONL in the same format (``source`` says where each caption came from).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from blip2_export.modelzoo import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_checkpoint
from runtime.errors import Blip2Error
from runtime.integrity import atomic_write_text
from trainer import data
from trainer.evaluate import itm_scores
from trainer.models import Stage1, generate_captions, tokenize


def corrupt_captions(records: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Give ``fraction`` of the records another record's (different) caption; mark them ``"noisy": true``."""
    if not 0 <= fraction < 1:
        raise Blip2Error(f"--fraction must be in [0, 1) (got {fraction})")
    rng = random.Random(seed)
    out = [dict(r, noisy=False) for r in records]
    chosen = rng.sample(range(len(records)), round(fraction * len(records)))
    for i in chosen:
        for _ in range(100):
            j = rng.randrange(len(records))
            if records[j]["caption"] != records[i]["caption"]:
                break
        out[i]["caption"] = records[j]["caption"]
        out[i]["noisy"] = True
    return out


@torch.no_grad()
def capfilt(data_dir: str | Path, jsonl: str | Path, captioner: str | Path, filter_model: str | Path,
            out: str | Path, threshold: float = 0.5, image_size: int | None = None,
            batch_size: int = 250) -> dict[str, float]:
    """Run CapFilt on the records of ``jsonl`` (image paths relative to ``data_dir``); write ``out``.

    Returns counts, and when the records carry ``noisy`` flags (see :func:`corrupt_captions`) the share
    of wrong pairs removed and right pairs kept.
    """

    stage1 = Stage1.load(filter_model)
    blip, tok, _ = load_checkpoint(captioner)
    size = image_size or stage1.spec.image_size
    records = data.read_jsonl(jsonl)
    tmp_name = Path(jsonl).name
    # load_split reads {split}.jsonl from data_dir; point it at the given file
    import numpy as np
    from PIL import Image


    arrays = []
    for rec in records:
        p = Path(data_dir) / rec["image"]
        if not p.is_file():
            raise Blip2Error(f"image {p} listed in {tmp_name} does not exist", hint="check --data")
        img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    px = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    px = (px - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)

    synthetic = generate_captions(blip, tok, px, batch_size=batch_size)
    originals = [r["caption"] for r in records]
    s_orig, s_syn = [], []
    for i in range(0, len(records), batch_size):
        emb = stage1.image_embeds(px[i:i + batch_size])
        for texts, acc in ((originals, s_orig), (synthetic, s_syn)):
            ids, att = tokenize(stage1.tokenizer, texts[i:i + batch_size])
            acc.append(itm_scores(stage1, emb, ids, att))
    s_orig_t, s_syn_t = torch.cat(s_orig), torch.cat(s_syn)

    lines = []
    for rec, syn, so, ss in zip(records, synthetic, s_orig_t.tolist(), s_syn_t.tolist()):
        base = {k: v for k, v in rec.items() if k not in ("caption", "noisy")}
        if so >= threshold:
            lines.append({**base, "caption": rec["caption"], "source": "original", "itm": round(so, 4)})
        if ss >= threshold and syn != rec["caption"]:
            lines.append({**base, "caption": syn, "source": "captioner", "itm": round(ss, 4)})
    atomic_write_text(out, "".join(json.dumps(line) + "\n" for line in lines))

    kept = s_orig_t >= threshold
    stats: dict[str, float] = {"records": len(records), "kept_original": int(kept.sum()),
                               "added_synthetic": sum(1 for line in lines if line["source"] == "captioner"),
                               "written": len(lines)}
    if all("noisy" in r for r in records):
        noisy = torch.tensor([bool(r["noisy"]) for r in records])
        if noisy.any():
            stats["wrong_removed"] = float((~kept & noisy).sum() / noisy.sum())
        if (~noisy).any():
            stats["right_kept"] = float((kept & ~noisy).sum() / (~noisy).sum())
    return stats
