"""Image-text retrieval with a stage-1 BLIP-2 bundle: ITC ranking, then ITM re-ranking of the top k.

    rt = RetrievalRuntime("itm-bundle/")
    captions = rt.encode_texts(["a cat on a table", "a red car", ...])   # once per caption set ...
    captions.save("captions.npz")                                        # ... and reused later
    images = rt.encode_images(["a.jpg", "b.jpg"])
    result = rt.retrieve(images, captions, rerank_top_k=16)
    result.i2t[0][0].index                                               # best caption for a.jpg

As in the BLIP-2 paper's retrieval evaluation (and LAVIS's implementation of it): the ITC similarity of
an (image, text) pair is the maximum over the image's query features of the cosine with the text's
[CLS] feature; the k best candidates by ITC are re-ranked by ``ITM match logit + ITC similarity``; the
rest keep their ITC order below them.

Needs numpy, tokenizers and one backend; no torch, no transformers.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.bundle_files import printable
from runtime.bundle_runtime import BundleRuntime
from runtime.contract import Family, GraphName
from runtime.deadline import deadline
from runtime.errors import BundleError, InputError, LimitError
from runtime.integrity import atomic_write_bytes
from runtime.preprocess import ImageLike, preprocess

TEXT_FEATURES_FORMAT = 1


@dataclass
class ImageSet:
    """Encoded images: the ViT output (the ITM graph's input) and the normalised query features."""

    names: list[str]
    embeds: np.ndarray  # [N, patches, vision_hidden]
    feats: np.ndarray  # [N, num_query_tokens, embed_dim]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class TextSet:
    """Encoded captions: token ids (the ITM graph's input) and normalised [CLS] features."""

    texts: list[str]
    ids: list[list[int]]
    feats: np.ndarray  # [M, embed_dim]
    bundle_key: str  # which bundle's tokenizer and text graph made them

    def __len__(self) -> int:
        return len(self.texts)

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (no pickles) atomically: texts, ids, features and the bundle they belong to."""
        width = max((len(i) for i in self.ids), default=0)
        ids = np.full((len(self.ids), width), -1, dtype=np.int64)
        for r, row in enumerate(self.ids):
            ids[r, :len(row)] = row
        meta = json.dumps({"format": TEXT_FEATURES_FORMAT, "bundle_key": self.bundle_key})
        buf = io.BytesIO()
        np.savez(buf, feats=self.feats.astype(np.float32), ids=ids, texts=np.array(self.texts, dtype=np.str_),
                 meta=np.array(meta))
        atomic_write_bytes(path, buf.getvalue())

    @staticmethod
    def load(path: str | Path) -> TextSet:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"text features file not found: {path}")
        try:
            _check_npz_sizes(path)
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                feats, ids, texts = z["feats"], z["ids"], [str(t) for t in z["texts"]]
        except InputError:
            raise
        except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError, zipfile.BadZipFile) as e:
            raise InputError(f"{path} is not a text features file written by 'retrieve "
                             f"--save-text-features': {printable(str(e))[:200]}") from None
        if not isinstance(meta, dict) or feats.dtype.kind != "f" or ids.dtype.kind not in "iu" or ids.ndim != 2:
            raise InputError(f"{path} is not a text features file written by 'retrieve --save-text-features' "
                             "(wrong field types)")
        if meta.get("format") != TEXT_FEATURES_FORMAT:
            raise InputError(f"{path} has text features format {meta.get('format')}, this version reads "
                             f"{TEXT_FEATURES_FORMAT}", hint="compute them again with --save-text-features")
        rows = [[int(t) for t in row if t >= 0] for row in ids]
        if not (len(texts) == len(rows) == feats.shape[0]) or feats.ndim != 2:
            raise InputError(f"{path} is inconsistent: {len(texts)} texts, {len(rows)} id rows, "
                             f"features of shape {feats.shape}")
        return TextSet(texts, rows, feats.astype(np.float32), str(meta.get("bundle_key", "")))


MAX_TEXT_FEATURES_BYTES = 1 << 30  # a million captions' features; more is not a file we wrote


def _check_npz_sizes(path: Path) -> None:
    """Refuse a ``.npz`` whose arrays would unpack to more than :data:`MAX_TEXT_FEATURES_BYTES` (a few MB of
    zip can declare gigabytes), before any array is read."""
    with zipfile.ZipFile(path) as zf:
        total = 0
        for info in zf.infolist():
            total += info.file_size
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
            if dtype.hasobject or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                raise InputError(f"{path}: array {printable(info.filename)} of shape {shape} does not fit its "
                                 "stored size", hint="compute the features again with --save-text-features")
        if total > MAX_TEXT_FEATURES_BYTES:
            raise InputError(f"{path} unpacks to {total} bytes, over the {MAX_TEXT_FEATURES_BYTES}-byte limit for "
                             "text features", hint="split the captions into several files")


def _timed(method):
    """Run a RetrievalRuntime call under the runtime's per-call deadline (``runtime.deadline``)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with deadline(self.timeout):
            return method(self, *args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Match:
    index: int  # the matched text (i2t) or image (t2i)
    itc: float  # ITC similarity
    itm: float | None  # ITM match logit, for re-ranked candidates
    score: float  # what the ranking sorts by: itm + itc when re-ranked, else itc


@dataclass
class RetrievalResult:
    itc: np.ndarray  # [images, texts]
    i2t: list[list[Match]] = field(default_factory=list)  # per image, texts best first
    t2i: list[list[Match]] = field(default_factory=list)  # per text, images best first


def itc_similarity(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    """[N, Q, E] x [M, E] -> [N, M]: the best query's cosine with each text (features are normalised)."""
    sims = np.einsum("nqe,me->nqm", image_feats.astype(np.float32), text_feats.astype(np.float32))
    return sims.max(axis=1)


def rank(scores: np.ndarray, k: int, itm: Callable[[list[tuple[int, int]]], np.ndarray] | None) -> list[list[Match]]:
    """Rank each row's columns by ``scores`` (ITC); re-rank the ``k`` best by ``itm(pairs) + itc``.

    ``itm`` takes (row, column) pairs and returns their ITM match logits. Ties keep index order.
    """
    n, m = scores.shape
    k = min(max(k, 0), m) if itm is not None else 0
    order = np.argsort(-scores, axis=1, kind="stable")
    pairs = [(r, int(c)) for r in range(n) for c in order[r, :k]]
    logits = itm(pairs) if itm is not None and pairs else np.zeros(0, dtype=np.float32)
    out: list[list[Match]] = []
    for r in range(n):
        top = [Match(c, float(scores[r, c]), float(logits[r * k + j]), float(logits[r * k + j] + scores[r, c]))
               for j, c in enumerate(order[r, :k].tolist())]
        top.sort(key=lambda mt: -mt.score)  # stable: equal scores keep ITC order
        rest = [Match(c, float(scores[r, c]), None, float(scores[r, c])) for c in order[r, k:].tolist()]
        out.append(top + rest)
    return out


class RetrievalRuntime(BundleRuntime):
    """Image-text retrieval with a stage-1 bundle: ITC features and the ITM head. ``timeout``: wall-clock
    seconds per call of encode_images / encode_texts / retrieve."""

    def check_family(self, family: Family) -> None:
        if family is not Family.RETRIEVAL:
            raise BundleError(f"{self.bundle} is not a retrieval bundle (its family is {family.value!r})",
                              hint="export a Blip2ForImageTextRetrieval checkpoint for retrieval")

    @property
    def max_batch(self) -> int:
        return self.manifest.dims["batch"].max

    @property
    def bundle_key(self) -> str:
        """Identifies the tokenizer + text graph that text features depend on."""
        return f"{self.manifest.files['tokenizer'].sha256[:16]}:" \
               f"{self.manifest.graph(GraphName.TEXT_FEATURES, self.precision).sha256[:16]}"

    def _chunks(self, n: int):
        for start in range(0, n, self.max_batch):
            yield slice(start, min(n, start + self.max_batch))

    # -- images ----------------------------------------------------------------------------------
    @_timed
    def encode_images(self, images: Sequence[ImageLike] | np.ndarray, names: Sequence[str] | None = None) -> ImageSet:
        """Images (paths, PIL, arrays) or pixel_values [N,3,H,W] -> :class:`ImageSet`."""
        pixel_values = images if isinstance(images, np.ndarray) and images.ndim == 4 else None
        items = list(images) if pixel_values is None else []
        n = len(items) if pixel_values is None else pixel_values.shape[0]
        if n < 1:
            raise InputError("no images given")
        if names is None:
            names = [str(x) if isinstance(x, (str, Path)) else f"image-{i}" for i, x in enumerate(items)] \
                if pixel_values is None else [f"image-{i}" for i in range(n)]
        embeds, feats = [], []
        for sl in self._chunks(n):
            pv = pixel_values[sl] if pixel_values is not None else preprocess(items[sl], self.manifest.preprocess)
            e = self.graph(GraphName.VISION).run({"pixel_values": pv})["image_embeds"]
            embeds.append(e)
            feats.append(self.graph(GraphName.IMAGE_FEATURES).run({"image_embeds": e})["image_feats"])
        return ImageSet(list(names), np.concatenate(embeds), np.concatenate(feats))

    # -- texts -----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        limit = self.manifest.dims["text"].max
        out = []
        for i, t in enumerate(texts):
            ids = self.tokenizer.encode(t)
            if len(ids) > limit:
                raise LimitError(f"text {i + 1} has {len(ids)} tokens; this bundle takes at most {limit}",
                                 hint="shorten it, or re-export with a larger --max-context")
            out.append(ids)
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.manifest.model.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):  # right padding keeps every token's position id
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return ids, mask

    @_timed
    def encode_texts(self, texts: Sequence[str]) -> TextSet:
        texts = list(texts)
        if not texts:
            raise InputError("no texts given")
        rows = self.tokenize(texts)
        feats = []
        for sl in self._chunks(len(rows)):
            ids, mask = self._pad(rows[sl])
            feats.append(self.graph(GraphName.TEXT_FEATURES).run({"input_ids": ids, "attention_mask": mask})
                         ["text_feats"])
        return TextSet(texts, rows, np.concatenate(feats), self.bundle_key)

    def load_texts(self, path: str | Path) -> TextSet:
        """Text features saved by :meth:`TextSet.save`, checked to come from this bundle."""
        ts = TextSet.load(path)
        if ts.bundle_key != self.bundle_key:
            raise InputError(f"text features in {path} were computed with another bundle or precision",
                             hint="compute them again with this bundle (--save-text-features)")
        return ts

    # -- scores ----------------------------------------------------------------------------------
    def similarity(self, images: ImageSet, texts: TextSet) -> np.ndarray:
        """ITC similarity matrix [images, texts]."""
        return itc_similarity(images.feats, texts.feats)

    def itm(self, images: ImageSet, texts: TextSet, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """ITM logits [len(pairs), 2] (no match, match) for (image index, text index) pairs."""
        pairs = list(pairs)
        out = []
        for sl in self._chunks(len(pairs)):
            chunk = pairs[sl]
            ids, mask = self._pad([texts.ids[t] for _, t in chunk])
            emb = images.embeds[[i for i, _ in chunk]]
            out.append(self.graph(GraphName.ITM).run({"image_embeds": emb, "input_ids": ids,
                                                      "attention_mask": mask})["itm_logits"])
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)

    @_timed
    def retrieve(self, images: ImageSet, texts: TextSet, *, rerank_top_k: int = 16,
                 directions: Sequence[str] = ("i2t", "t2i")) -> RetrievalResult:
        """ITC ranking both ways, the ``rerank_top_k`` best of each re-ranked with ITM (0: ITC only).

        ITM logits of a pair are computed once even when it is a candidate in both directions.
        """
        if rerank_top_k < 0:
            raise InputError(f"rerank_top_k must be >= 0 (got {rerank_top_k})")
        itc = self.similarity(images, texts)
        cache: dict[tuple[int, int], float] = {}

        def match_logits(pairs: list[tuple[int, int]]) -> np.ndarray:
            todo = [p for p in dict.fromkeys(pairs) if p not in cache]
            if todo:
                for p, row in zip(todo, self.itm(images, texts, todo)):
                    cache[p] = float(row[1])
            return np.array([cache[p] for p in pairs], dtype=np.float32)

        result = RetrievalResult(itc)
        if "i2t" in directions:
            result.i2t = rank(itc, rerank_top_k, match_logits)
        if "t2i" in directions:
            result.t2i = rank(itc.T, rerank_top_k, lambda pairs: match_logits([(i, t) for t, i in pairs]))
        return result


def read_texts(path: str | Path) -> list[str]:
    """One caption per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"{path} holds no captions (one per line)")
    return texts


def format_result(result: RetrievalResult, image_names: Sequence[str], texts: Sequence[str], *, top: int,
                  direction: str) -> list[str]:
    """Human-readable lines: each query and its ``top`` matches with scores."""
    lines = []
    if direction in ("i2t", "both"):
        for name, matches in zip(image_names, result.i2t):
            lines.append(f"{name}:")
            lines += [_line(r, mt, texts[mt.index]) for r, mt in enumerate(matches[:top], 1)]
    if direction in ("t2i", "both"):
        for text, matches in zip(texts, result.t2i):
            lines.append(f"{text!r}:")
            lines += [_line(r, mt, image_names[mt.index]) for r, mt in enumerate(matches[:top], 1)]
    return lines


def _line(rank_: int, mt: Match, what: str) -> str:
    itm = f"itm {mt.itm:+.4f}" if mt.itm is not None else "itm    -   "
    return f"  {rank_:>2}. score {mt.score:+.4f}  (itc {mt.itc:+.4f}, {itm})  {what}"
