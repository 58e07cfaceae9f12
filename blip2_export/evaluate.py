"""Task quality of a bundle on a captioned dataset, through the runtime (no torch).

The dataset is the COCO/LAVIS-style layout ``trainer`` writes and users bring: ``<split>.jsonl`` with
``{"image": <path relative to the folder>, "caption": ...}`` lines. A generative bundle is scored by
caption exact match (and word accuracy); a retrieval bundle by image->text and text->image R@1 among
``candidates`` pairs. Used to check that a reduced-precision build keeps the quality of fp32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.contract import Family
from runtime.errors import Blip2Error
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime
from runtime.retrieval import RetrievalRuntime


@dataclass
class Quality:
    bundle: str
    precision: str
    split: str
    items: int
    exact_match: float | None = None
    word_accuracy: float | None = None
    i2t_r1: float | None = None
    t2i_r1: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        head = f"{self.precision} on {self.items} {self.split} items:"
        if self.exact_match is not None:
            return f"{head} caption exact match {self.exact_match:.3f}, word accuracy {self.word_accuracy:.3f}"
        return f"{head} R@1 image->text {self.i2t_r1:.3f}, text->image {self.t2i_r1:.3f}"


def read_split(data: str | Path, split: str, limit: int | None) -> list[tuple[Path, str]]:
    data = Path(data)
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise Blip2Error(f"no {split}.jsonl in {data}", hint="point --data at a folder with <split>.jsonl files")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            items.append((data / rec["image"], str(rec["caption"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Blip2Error(f"{path}:{n} is not a {{\"image\": ..., \"caption\": ...}} JSON line") from None
        if limit and len(items) >= limit:
            break
    if not items:
        raise Blip2Error(f"{path} has no items")
    return items


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def evaluate(bundle: str | Path, data: str | Path, *, split: str = "test", precision: str = "fp32",
             limit: int | None = 100, prompt: str = "", batch: int = 8, max_new_tokens: int = 20,
             progress: bool = False, **backend_options) -> Quality:
    family = load_manifest(bundle, verify=False).family
    items = read_split(data, split, limit)
    q = Quality(str(bundle), precision, split, len(items))
    chunks = range(0, len(items), batch)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"evaluate {precision}", unit="batch")
    if family is Family.RETRIEVAL:

        rt = RetrievalRuntime(bundle, precision=precision, **backend_options)
        captions = [c for _, c in items]
        texts = rt.encode_texts(captions)
        feats = [rt.encode_images([str(p) for p, _ in items[i:i + batch]]) for i in chunks]
        sims = np.concatenate([rt.similarity(f, texts) for f in feats])  # [images, texts]
        same = np.array([[_norm(a) == _norm(b) for b in captions] for a in captions])  # duplicates count
        q.i2t_r1 = float(np.mean(same[np.arange(len(items)), sims.argmax(axis=1)]))
        q.t2i_r1 = float(np.mean(same[sims.argmax(axis=0), np.arange(len(items))]))
        return q

    rt = Blip2Runtime(bundle, precision=precision, **backend_options)
    exact, words, total_words = 0, 0, 0
    for i in chunks:
        chunk = items[i:i + batch]
        out = rt.generate([str(p) for p, _ in chunk], prompt, max_new_tokens=max_new_tokens)
        for (_, ref), g in zip(chunk, out):
            a, b = _norm(g.text).split(), _norm(ref).split()
            exact += a == b
            words += sum(x == y for x, y in zip(a, b))
            total_words += max(len(a), len(b))
    q.exact_match = exact / len(items)
    q.word_accuracy = words / total_words if total_words else 0.0
    return q
