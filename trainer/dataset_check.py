"""The dataset check that runs before fine-tuning: every record of a JSONL file, every image it names.

A record is ``{"image", "caption"}`` (captioning) or ``{"image", "question", "answer"}`` (VQA); image paths
are relative to the folder of the JSONL file (absolute paths are kept). A record is *bad* when its line is
not a JSON object, it has neither form, its text is empty, its image is missing or cannot be decoded, or
it repeats an earlier record (same image file and same text). :func:`check_jsonl` reports each kind
with a count and the first offending lines; ``--skip-bad`` trains on the good records only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import Blip2Error
from runtime.preprocess import load_image

KINDS = ("invalid JSON", "no caption or question/answer", "empty text", "missing image", "unreadable image",
         "duplicate")


@dataclass(frozen=True)
class Sample:
    """One good record: the image file, the task and its texts (``question`` is empty for a caption)."""

    image: Path
    kind: str  # "caption" | "vqa"
    target: str  # the caption or the answer
    question: str = ""
    line: int = 0


@dataclass(frozen=True)
class Problem:
    line: int
    kind: str
    detail: str


@dataclass
class DatasetReport:
    file: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c[k] for k in KINDS if c[k]}

    def lines(self, first: int = 5) -> list[str]:
        """Human-readable report: totals, a count per kind, the first offending lines."""
        n = len(self.samples) + len(self.problems)
        out = [f"{self.file}: {n} records, {len(self.samples)} good, {len(self.problems)} bad"]
        out += [f"  {k}: {v}" for k, v in self.counts.items()]
        out += [f"  {self.file.name}:{p.line}: {p.kind}: {p.detail}" for p in self.problems[:first]]
        if len(self.problems) > first:
            out.append(f"  ... and {len(self.problems) - first} more")
        return out

    def summary(self) -> str:
        first = self.problems[0] if self.problems else None
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        where = f"; first: line {first.line} ({first.kind}: {first.detail})" if first else ""
        return f"{self.file}: {len(self.problems)} bad records ({counts}){where}"


def _text(rec: dict, key: str) -> str | None:
    v = rec.get(key)
    return " ".join(v.split()) if isinstance(v, str) else None


def _readable(path: Path) -> str | None:
    """``None`` when the image decodes (as training will read it), else the reason."""

    try:
        img = load_image(path)
        img.load()
    except Blip2Error as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable image
        return f"{type(e).__name__}: {e}"
    return None


def check_jsonl(path: str | Path, limit: int | None = None) -> DatasetReport:
    """Check every record of ``path`` (the first ``limit`` non-blank lines when given)."""
    path = Path(path)
    if not path.is_file():
        raise Blip2Error(f"dataset file not found: {path}",
                         hint="--data wants a folder with train.jsonl ({'image', 'caption'} or "
                              "{'image', 'question', 'answer'} per line)")
    report = DatasetReport(path)
    root = path.parent
    seen: dict[tuple, int] = {}
    readable: dict[Path, str | None] = {}
    count = 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        count += 1
        if limit is not None and count > limit:
            break
        bad = report.problems.append
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad(Problem(n, "invalid JSON", str(e)))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not (
                "caption" in rec or ("question" in rec and "answer" in rec)):
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            bad(Problem(n, "no caption or question/answer", f"needs 'image' and 'caption', or 'image', "
                                                            f"'question' and 'answer' (got {keys})"))
            continue
        if "caption" in rec:
            kind, target, question = "caption", _text(rec, "caption"), ""
        else:
            kind, target, question = "vqa", _text(rec, "answer"), _text(rec, "question")
        if not target or (kind == "vqa" and not question):
            empty = "caption" if kind == "caption" else ("question" if not question else "answer")
            bad(Problem(n, "empty text", f"empty {empty}"))
            continue
        image = Path(rec["image"]) if Path(rec["image"]).is_absolute() else root / rec["image"]
        if not image.is_file():
            bad(Problem(n, "missing image", rec["image"]))
            continue
        if image not in readable:
            readable[image] = _readable(image)
        if readable[image] is not None:
            bad(Problem(n, "unreadable image", f"{rec['image']}: {readable[image]}"))
            continue
        key = (image.resolve(), kind, question.lower(), target.lower())
        if key in seen:
            bad(Problem(n, "duplicate", f"same as line {seen[key]}"))
            continue
        seen[key] = n
        report.samples.append(Sample(image, kind, target, question, n))
    return report
