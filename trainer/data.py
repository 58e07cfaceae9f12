"""Image-caption data: a deterministic synthetic scene generator and the JSONL dataset format.

A dataset is a folder with ``{split}.jsonl`` files of ``{"image": "images/x.png", "caption": "..."}``
records (the COCO/LAVIS caption format; image paths relative to the folder) and the image files.
Users' own data uses the same layout. The synthetic generator draws scenes of 1-3 objects of one
colour/shape/size placed in one region of the image and writes one canonical caption per scene, e.g.
``"two large red circles on the left"``; it also stores the attribute labels in the records so that
unimodal pre-training and evaluation can use them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from blip2_export.modelzoo import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from runtime.errors import Blip2Error
from runtime.integrity import atomic_directory

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "large": 0.2}  # bounding-box side as a fraction of the image side
# Regions as (x0, y0, x1, y1) fractions of the image. Objects of a group sit in equal slots along the
# region's long axis (so they never overlap), jittered inside their slot.
REGIONS = {
    "left": (0.02, 0.1, 0.3, 0.9), "right": (0.7, 0.1, 0.98, 0.9),
    "top": (0.1, 0.02, 0.9, 0.3), "bottom": (0.1, 0.7, 0.9, 0.98), "center": (0.15, 0.35, 0.85, 0.65),
}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
COUNTS = {1: "a", 2: "two", 3: "three"}
ATTRIBUTES = ("count", "size", "colour", "shape", "position")
ATTRIBUTE_VALUES = {
    "count": list(COUNTS.values()), "size": list(SIZES), "colour": list(COLOURS),
    "shape": list(SHAPES), "position": list(REGIONS),
}
SPLITS = ("train", "val", "test")
BACKGROUND = (20, 20, 24)


@dataclass(frozen=True)
class Scene:
    count: int
    size: str
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        shape = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS[self.count]} {self.size} {self.colour} {shape} {POSITION_PHRASE[self.position]}"

    def labels(self) -> dict[str, str]:
        return {"count": COUNTS[self.count], "size": self.size, "colour": self.colour,
                "shape": self.shape, "position": self.position}


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain (the tokenizer's extra words)."""
    words: list[str] = []
    for s in (*COUNTS.values(), *SIZES, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
              *POSITION_PHRASE.values()):
        words += [w for w in s.split() if w not in words]
    return words


def random_scene(rng: random.Random) -> Scene:
    return Scene(count=rng.choice(list(COUNTS)), size=rng.choice(list(SIZES)), colour=rng.choice(list(COLOURS)),
                 shape=rng.choice(SHAPES), position=rng.choice(list(REGIONS)))


def render(scene: Scene, rng: random.Random, image_size: int = 64):
    """Draw ``scene`` at 4x resolution and downsample (anti-aliased); returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    big = image_size * 4
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    side = SIZES[scene.size]
    x0, y0, x1, y1 = REGIONS[scene.position]
    horizontal = (x1 - x0) >= (y1 - y0)
    (a, b), (c, d) = ((x0, x1), (y0, y1)) if horizontal else ((y0, y1), (x0, x1))
    slot = (b - a) / scene.count
    for i in range(scene.count):
        along = a + (i + 0.5) * slot + rng.uniform(-1, 1) * max(slot - side, 0) / 2 * 0.8
        across = (c + d) / 2 + rng.uniform(-1, 1) * max(d - c - side, 0) / 2 * 0.8
        cx, cy = ((along, across) if horizontal else (across, along))
        cx, cy, half = cx * big, cy * big, side * big / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return img.resize((image_size, image_size), Image.LANCZOS)


def generate_dataset(out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0,
                     image_size: int = 64, force: bool = False) -> Path:
    """Write the synthetic dataset to ``out``: ``{split}.jsonl`` + ``images/``. Deterministic in ``seed``.

    Test captions are the same kind of captions as train ones (the caption space is small enough that most
    appear in training); test images are new draws.
    """

    sizes = sizes or {"train": 8000, "val": 500, "test": 500}
    with atomic_directory(out, force=force) as tmp:
        (tmp / "images").mkdir()
        for split_index, split in enumerate(SPLITS):
            rng = random.Random(f"{seed}-{split_index}")
            lines = []
            for i in range(sizes.get(split, 0)):
                scene = random_scene(rng)
                name = f"images/{split}_{i:06d}.png"
                render(scene, rng, image_size).save(tmp / name)
                lines.append(json.dumps({"image": name, "caption": scene.caption(), **scene.labels()}))
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        (tmp / "dataset.json").write_text(json.dumps(
            {"generator": "blip2-train data", "seed": seed, "image_size": image_size, "sizes": sizes,
             "vocabulary": vocabulary()}, indent=2))
    return Path(out)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise Blip2Error(f"dataset file not found: {path}",
                         hint="create one with `blip2-train data OUT` or point --data at a folder with train.jsonl")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Blip2Error(f"{path}:{n} is not valid JSON: {e}") from None
        if "image" not in rec or "caption" not in rec:
            raise Blip2Error(f"{path}:{n} needs the keys 'image' and 'caption' (got {sorted(rec)})")
        records.append(rec)
    return records


def load_split(data_dir: str | Path, split: str, image_size: int, limit: int | None = None):
    """Return ``(records, pixel_values)``: the records of ``{split}.jsonl`` and their normalised images.

    Images are resized to ``image_size`` and normalised like ``modelzoo.make_image_processor`` does;
    everything is small enough to hold in memory as one tensor.
    """
    import numpy as np
    import torch
    from PIL import Image


    data_dir = Path(data_dir)
    records = read_jsonl(data_dir / f"{split}.jsonl")[:limit]
    if not records:
        raise Blip2Error(f"{data_dir / (split + '.jsonl')} has no records")
    arrays = []
    for rec in records:
        p = data_dir / rec["image"]
        if not p.is_file():
            raise Blip2Error(f"image {p} listed in {split}.jsonl does not exist")
        img = Image.open(p).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return records, ((x - mean) / std).contiguous()


def dataset_vocabulary(data_dir: str | Path) -> list[str]:
    """Words of all captions in the folder (synthetic: the generator's full vocabulary)."""
    data_dir = Path(data_dir)
    meta = data_dir / "dataset.json"
    if meta.is_file():
        return list(json.loads(meta.read_text())["vocabulary"])
    words: list[str] = []
    seen = set()
    for split in SPLITS:
        f = data_dir / f"{split}.jsonl"
        if f.is_file():
            for rec in read_jsonl(f):
                for w in rec["caption"].lower().replace(",", " , ").replace(".", " . ").split():
                    if w not in seen:
                        seen.add(w)
                        words.append(w)
    return words


# -- a shifted task for fine-tuning: questions about the scenes, over image files of mixed formats --------
VQA_QUESTIONS = {  # question -> the scene attribute that answers it (words the demo model's tokenizer knows)
    "how many are there?": "count",
    "what color is the shape?": "colour",
}
COUNT_ANSWERS = {1: "one", 2: "two", 3: "three"}
# (suffix, PIL mode, size factor, save options): the files users have, not only 64 px PNGs
IMAGE_FORMATS = (
    ("png", "RGB", 1.0, {}),
    ("jpg", "RGB", 1.5, {"quality": 92}),
    ("png", "RGBA", 2.0, {}),  # opaque alpha band: composited onto white, the pixels stay the same
    ("bmp", "RGB", 0.75, {}),
    ("webp", "RGB", 1.25, {"quality": 95}),
    ("jpg", "RGB", (1.6, 1.2), {"quality": 92}),  # not square
)


def scene_answer(scene: Scene, attribute: str) -> str:
    if attribute == "count":
        return COUNT_ANSWERS[scene.count]
    return scene.labels()[attribute]


def generate_vqa_dataset(out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0,
                         image_size: int = 64, force: bool = False) -> Path:
    """Write a VQA dataset over the synthetic scenes: ``{split}.jsonl`` of ``{"image", "question", "answer"}``.

    Each image gets every question of :data:`VQA_QUESTIONS` (answers: ``one``/``two``/``three``, or a colour).
    Images are saved in the :data:`IMAGE_FORMATS` in turn (PNG, JPEG, RGBA PNG, BMP, WebP, a non-square JPEG)
    at several sizes, so a fine-tune reads files as users have them. Deterministic in ``seed``.
    """
    from PIL import Image


    sizes = sizes or {"train": 400, "val": 100, "test": 100}
    with atomic_directory(out, force=force) as tmp:
        (tmp / "images").mkdir()
        for split_index, split in enumerate(SPLITS):
            rng = random.Random(f"vqa-{seed}-{split_index}")
            lines = []
            for i in range(sizes.get(split, 0)):
                scene = random_scene(rng)
                suffix, mode, factor, opts = IMAGE_FORMATS[i % len(IMAGE_FORMATS)]
                w, h = factor if isinstance(factor, tuple) else (factor, factor)
                img = render(scene, rng, image_size).resize((round(image_size * w), round(image_size * h)),
                                                            Image.BICUBIC).convert(mode)
                name = f"images/{split}_{i:06d}.{suffix}"
                img.save(tmp / name, **opts)
                for question, attribute in VQA_QUESTIONS.items():
                    lines.append(json.dumps({"image": name, "question": question,
                                             "answer": scene_answer(scene, attribute)}))
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return Path(out)
