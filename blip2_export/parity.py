"""Eager transformers model vs bundle runtime, on the same images and prompts.

Per stage (preprocess, vision, visual prefix): max abs diff and cosine. Per generation: token-exact
agreement with ``Blip2ForConditionalGeneration.generate``, the first divergence step, and the max
logits difference along the eager model's token path (teacher-forced, so one early flip does not
hide how close the rest is). Thresholds per precision live in :data:`THRESHOLDS` (and README).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from blip2_export.families import load_for_export
from blip2_export.graphs import QFormerGraph
from blip2_export.modelzoo import load_retrieval_checkpoint
from blip2_export.weights import release_freed_memory
from runtime.errors import Blip2Error, Blip2Warning
from runtime.generation import GenerationConfig
from runtime.integrity import atomic_write_text
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime
from runtime.precisions import PRECISIONS as PRECISION_SPECS
from runtime.precisions import ParityThresholds
from runtime.preprocess import image_files, load_image, preprocess
from runtime.retrieval import RetrievalRuntime, rank

DEFAULT_PROMPTS = ("", "a photo of", "Question: what is in the picture? Answer:")


Thresholds = ParityThresholds  # one declaration per precision: runtime.precisions

# The one table of parity thresholds (README quotes it), read from the precision registry.
THRESHOLDS: dict[str, Thresholds] = {p.name: p.parity for p in PRECISION_SPECS.values()}


@dataclass
class StageResult:
    name: str
    max_abs: float
    cosine: float
    ok: bool


@dataclass
class GenResult:
    image: str
    prompt: str
    eager_ids: list[int]
    runtime_ids: list[int]
    agree_tokens: int
    total_tokens: int
    first_divergence: int | None  # step index, None when identical
    max_logits_diff: float | None
    eager_text: str
    runtime_text: str
    forced_top1: tuple[int, int] | None = None  # (steps whose top-1 equals eager's token, steps), teacher-forced


@dataclass
class ParityReport:
    precision: str
    backend: str
    num_beams: int
    batch: int
    max_new_tokens: int
    thresholds: Thresholds
    stages: list[StageResult] = field(default_factory=list)
    generations: list[GenResult] = field(default_factory=list)
    reference_drift: list[str] = field(default_factory=list)  # eager versions that differ from the export's

    @property
    def token_agreement(self) -> float:
        total = sum(g.total_tokens for g in self.generations)
        return sum(g.agree_tokens for g in self.generations) / total if total else 1.0

    @property
    def exact_sequences(self) -> int:
        return sum(g.first_divergence is None for g in self.generations)

    @property
    def forced_top1(self) -> float | None:
        """Top-1 agreement with eager's tokens when both follow eager's path (None when not measured)."""
        pairs = [g.forced_top1 for g in self.generations if g.forced_top1 is not None]
        steps = sum(n for _, n in pairs)
        return sum(a for a, _ in pairs) / steps if steps else None

    @property
    def nonfinite(self) -> bool:
        return any(not np.isfinite(s.max_abs) for s in self.stages)

    @property
    def ok(self) -> bool:
        t = self.thresholds
        forced = self.forced_top1
        return (all(s.ok for s in self.stages) and self.token_agreement >= t.token_agreement
                and (t.forced_top1 is None or forced is None or forced >= t.forced_top1)
                and not self.nonfinite)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(token_agreement=self.token_agreement, exact_sequences=self.exact_sequences,
                 forced_top1=self.forced_top1, ok=self.ok)
        return d

    def render(self) -> str:
        t = self.thresholds
        lines = [(f"parity: {self.precision} on {self.backend}, beams={self.num_beams}, batch={self.batch}, "
                 f"{self.max_new_tokens} new tokens"), "", "stage            max_abs_diff   cosine      ok"]
        for s in self.stages:
            lines.append(f"{s.name:<16} {s.max_abs:<14.3e} {s.cosine:<11.7f} {'yes' if s.ok else 'NO'}")
        lines.append("")
        n = len(self.generations)
        divs = [g.first_divergence for g in self.generations if g.first_divergence is not None]
        ld = [g.max_logits_diff for g in self.generations if g.max_logits_diff is not None]
        lines.append(f"generations: {self.exact_sequences}/{n} token-identical, token agreement "
                     f"{self.token_agreement:.4f} (need >= {t.token_agreement})")
        if divs:
            lines.append(f"first divergence steps: {sorted(divs)}")
        if self.forced_top1 is not None:
            need = f"need >= {t.forced_top1}" if t.forced_top1 is not None else "reported"
            lines.append(f"teacher-forced top-1 agreement with eager: {self.forced_top1:.4f} ({need})")
        if ld:
            lines.append(f"max logits diff along the eager path: {max(ld):.3e}")
        for g in self.generations[:3]:
            lines.append(f"  [{g.image} | {g.prompt!r}] eager: {g.eager_text!r}  runtime: {g.runtime_text!r}")
        lines.append("")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else 1.0


def _stage(name: str, ref: np.ndarray, got: np.ndarray, t: Thresholds) -> StageResult:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(got).all():
        max_abs = float("inf")
    cos = _cosine(ref, got)
    ok = cos >= t.stage_cosine and (t.stage_max_abs is None or max_abs <= t.stage_max_abs)
    return StageResult(name, max_abs, cos, bool(ok and np.isfinite(max_abs)))


def reference_drift(exported: dict[str, str]) -> list[str]:
    """How the eager side here differs from the one the bundle was exported and checked against.

    ``exported`` is the manifest's ``versions``; the answer names each of transformers / torch whose
    version differs (one line each), [] when they agree or the manifest does not say.
    """
    import torch
    import transformers

    here = {"transformers": transformers.__version__, "torch": torch.__version__}
    return [f"the eager reference runs {name} {here[name]}, but the bundle was exported with {name} "
            f"{exported[name]}: a difference may come from {name}, not from the bundle"
            for name in ("transformers", "torch") if exported.get(name) and exported[name] != here[name]]


def warn_reference_drift(exported: dict[str, str]) -> list[str]:
    import warnings


    drift = reference_drift(exported)
    for line in drift:
        warnings.warn(line, Blip2Warning, stacklevel=3)
    return drift


def list_images(folder: str | Path | None, count: int = 8) -> list:
    """Image files in ``folder`` (sorted), or ``count`` deterministic synthetic images."""
    from PIL import Image

    if folder is None:
        rng = np.random.default_rng(0)
        out = []
        for i in range(count):
            h, w = 48 + 8 * (i % 3), 64 - 4 * (i % 4)
            base = rng.integers(0, 256, size=(1, 1, 3))
            a = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(a)
            img.filename = f"synthetic-{i}"  # type: ignore[attr-defined]
            out.append(img)
        return out

    return image_files(folder)


def run_parity(checkpoint: str | Path, bundle: str | Path, *, images=None, prompts=DEFAULT_PROMPTS,
               precision: str = "fp32", backend: str = "ort", num_beams: int = 1, batch: int = 1,
               max_new_tokens: int = 32, model_and_tokenizer=None, progress: bool = False,
               logits_diff: bool = True, eager_cache: dict | None = None, **backend_options) -> ParityReport:
    """Compare eager and bundle. ``eager_cache`` (a dict) lets several calls share eager generations;
    ``logits_diff=False`` skips the teacher-forced logits comparison.

    The two sides run one after the other, never both in memory (a model near the machine's size fits):
    the eager model computes every reference (stages, generations, teacher-forced logits) and is
    released when it was loaded here, then the bundle is loaded and compared against them."""

    if precision not in THRESHOLDS:
        raise Blip2Error(f"unknown precision {precision!r}; choose one of: {', '.join(THRESHOLDS)}")
    # the special ids and versions (names resolved, nothing hashed: the runtime checks what it reads)
    manifest = load_manifest(bundle, verify=False)
    for name in manifest.graphs.get("fp32", {}):  # a missing precision fails now, not after the eager run
        manifest.graph(name, precision)
    t = THRESHOLDS[precision]
    report = ParityReport(precision, backend, num_beams, batch, max_new_tokens, t)
    report.reference_drift = warn_reference_drift(manifest.versions)
    files = list(images) if images is not None else list_images(None)
    names = [str(getattr(f, "filename", f)) if not isinstance(f, (str, Path)) else Path(f).name for f in files]
    pil = [load_image(f) for f in files]
    jobs = [(i, p) for i in range(len(pil)) for p in prompts]

    ref = _eager_references(checkpoint, model_and_tokenizer, manifest, pil, names, jobs, num_beams,
                            max_new_tokens, logits_diff, eager_cache)
    return _compare_runtime(bundle, precision, backend, backend_options, report, ref, pil, names, jobs,
                            num_beams, batch, max_new_tokens, progress)


def _eager_references(checkpoint, model_and_tokenizer, manifest, pil, names, jobs, num_beams: int,
                      max_new_tokens: int, logits_diff: bool, eager_cache: dict | None) -> dict:
    """Everything the eager model contributes to a parity run, as arrays and token lists (the family
    adapter, :mod:`blip2_export.families`, says how its model generates and what its logits are)."""
    import gc

    import torch


    family, (model, tokenizer, processor), _ = load_for_export(checkpoint, model_and_tokenizer, lazy=False)
    model = model.float().eval()
    facts = manifest.model
    nq, image_id = model.config.num_query_tokens, model.config.image_token_index
    # The special ids the exporter resolved (text_config, then generation_config.json, then the tokenizer),
    # given to eager generate too: both sides stop and start on the same tokens by construction.
    special_ids = family.eager_special_ids(facts)
    pv_ref = processor(pil, return_tensors="pt")["pixel_values"].float()
    with torch.no_grad():
        emb_ref = model.vision_model(pixel_values=pv_ref, return_dict=True).last_hidden_state
        prefix_ref = QFormerGraph(model)(emb_ref)
    out: dict = {"pixel_values": pv_ref.numpy(), "image_embeds": emb_ref.numpy(), "prefix": prefix_ref.numpy(),
                 "jobs": []}
    for i, p in jobs:
        text_ids = tokenizer(p).input_ids
        # Both families: generate scatters the image features over the <image> placeholders (the
        # processor puts num_query_tokens of them before the text); T5 without them never sees the image.
        ids = torch.tensor([[image_id] * nq + text_ids])
        key = (id(model), names[i], p, num_beams, max_new_tokens)
        if eager_cache is not None and key in eager_cache:
            tokens = eager_cache[key]
        else:
            with torch.no_grad():
                gen = model.generate(pixel_values=pv_ref[i:i + 1], input_ids=ids,
                                     attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=num_beams, **special_ids)
            tokens = family.eager_new_tokens(gen[0].tolist(), ids.shape[1])
            tokens = _trim(tokens, list(facts.eos_token_ids), facts.pad_token_id)
            if eager_cache is not None:
                eager_cache[key] = tokens
        logits = None
        if logits_diff and tokens:  # eager logits along its own tokens (teacher forcing)
            logits = family.eager_forced_logits(model, prefix_ref[i:i + 1], text_ids, tokens, facts)
        out["jobs"].append({"text_ids": text_ids, "tokens": tokens, "logits": logits,
                            "text": tokenizer.decode(tokens, skip_special_tokens=True).strip()})
    if model_and_tokenizer is None:  # loaded here: gone before the bundle comes in
        del model, emb_ref, prefix_ref
        gc.collect()

        release_freed_memory()
    return out


def _compare_runtime(bundle, precision: str, backend: str, backend_options: dict, report: ParityReport,
                     ref: dict, pil, names, jobs, num_beams: int, batch: int, max_new_tokens: int,
                     progress: bool) -> ParityReport:

    rt = Blip2Runtime(bundle, precision=precision, backend=backend, **backend_options)
    t = report.thresholds
    pv = rt.pixel_values(pil)
    report.stages.append(_stage("preprocess", ref["pixel_values"], pv, THRESHOLDS["fp32"]))
    emb = np.concatenate([rt.image_embeds(pv[i:i + 1]) for i in range(len(pil))])
    prefix = np.concatenate([rt.image_features(pv[i:i + 1]) for i in range(len(pil))])
    report.stages.append(_stage("vision", ref["image_embeds"], emb, t))
    report.stages.append(_stage("visual_prefix", ref["prefix"], prefix, t))

    # generation: eager one sample at a time (the reference), runtime in batches of `batch`
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams)
    it = range(0, len(jobs), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="parity", unit="batch")
    for start in it:
        chunk = jobs[start:start + batch]
        got = rt.generate(prompts=[p for _, p in chunk], prefix=prefix[[i for i, _ in chunk]], config=cfg)
        for k, ((i, p), g) in enumerate(zip(chunk, got)):
            job = ref["jobs"][start + k]
            tokens = job["tokens"]
            agree = sum(a == b for a, b in zip(tokens, g.token_ids))
            first = next((n for n, (a, b) in enumerate(zip(tokens, g.token_ids)) if a != b), None)
            if first is None and len(tokens) != len(g.token_ids):
                first = min(len(tokens), len(g.token_ids))
            ld, top1 = None, None
            if job["logits"] is not None:  # both follow the eager tokens: largest logits gap, top-1 agreement
                sm = rt.step_model(prefix[i:i + 1], [list(job["text_ids"])])
                ld, top1 = _stepwise_max_diff(sm, tokens, job["logits"])
            report.generations.append(GenResult(
                names[i], p, tokens, g.token_ids, agree, max(len(tokens), len(g.token_ids)), first, ld,
                job["text"], g.text, top1))
    return report


def _trim(ids: list[int], eos, pad: int) -> list[int]:
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    out = []
    for tok in ids:
        out.append(tok)
        if tok in eos_ids:
            break
    return out


def _stepwise_max_diff(sm, ref: list[int], logits_ref: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Prefill, then feed the eager tokens one by one. Returns the largest |logits - eager logits| over the
    steps, and (steps where the runtime's top-1 is eager's next token, steps)."""
    logits, state = sm.prefill()
    diffs = [float(np.abs(logits[0] - logits_ref[0]).max())]
    top1 = [int(np.argmax(logits[0])) == ref[0]]
    for k, tok in enumerate(ref[:-1], start=1):
        logits, state = sm.step(np.array([tok]), state)
        diffs.append(float(np.abs(logits[0] - logits_ref[k]).max()))
        top1.append(int(np.argmax(logits[0])) == ref[k])
    return max(diffs), (sum(top1), len(top1))


def save_report(report: ParityReport, path: str | Path) -> None:

    atomic_write_text(path, json.dumps(report.to_json(), indent=2))


# -- retrieval (stage-1 model) ------------------------------------------------------------------------
DEFAULT_CAPTIONS = (
    "a photo of a cat", "a red car", "two dogs on the table", "blue sky", "a small green tree on the left",
    "what is in the picture", "a large white square", "three yellow circles and a purple triangle",
    "the dog", "an orange circle on top of a black table with a big blue car on the right",
)

RETRIEVAL_TOLERANCE = 1e-4  # ITC similarities and ITM logits, fp32


@dataclass
class RetrievalParityReport:
    precision: str
    backend: str
    images: int
    texts: int
    rerank_top_k: int
    tolerance: float
    stages: list[StageResult] = field(default_factory=list)
    itc_max_abs: float = 0.0
    itm_max_abs: float = 0.0
    itc_rankings_equal: bool = False
    reranked_equal: bool = False
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if not all(s.ok for s in self.stages):
            return False
        if self.precision != "fp32":
            # Reduced precision is judged per stage by the THRESHOLDS table (cosine, finite values); the
            # exact scores and rankings below are reported, and a trained model's R@1 drop is the real test.
            return bool(np.isfinite(self.itc_max_abs) and np.isfinite(self.itm_max_abs))
        return (self.itc_max_abs <= self.tolerance and self.itm_max_abs <= self.tolerance
                and self.itc_rankings_equal and self.reranked_equal)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def render(self) -> str:
        head = (f"retrieval parity: {self.precision} on {self.backend}, {self.images} images x {self.texts} "
                f"texts, ITM re-ranking of the top {self.rerank_top_k}")
        need = f"need <= {self.tolerance:g}" if self.precision == "fp32" else "reported"
        lines = [head, "", "stage            max_abs_diff   cosine      ok"]
        for s in self.stages:
            lines.append(f"{s.name:<16} {s.max_abs:<14.3e} {s.cosine:<11.7f} {'yes' if s.ok else 'NO'}")
        lines += [
            "",
            f"ITC similarity matrix: max abs diff {self.itc_max_abs:.3e} ({need})",
            (f"ITM logits, all {self.images * self.texts} pairs: max abs diff {self.itm_max_abs:.3e} "
             f"({need})"),
            f"ITC rankings (image->text and text->image) identical: {'yes' if self.itc_rankings_equal else 'NO'}",
            f"ITM re-ranked top-{self.rerank_top_k} identical: {'yes' if self.reranked_equal else 'NO'}",
            *self.examples, "", "PASS" if self.ok else "FAIL",
        ]
        return "\n".join(lines)


def run_retrieval_parity(checkpoint: str | Path, bundle: str | Path, *, images=None, texts=DEFAULT_CAPTIONS,
                         precision: str = "fp32", backend: str = "ort", rerank_top_k: int = 4,
                         model_and_tokenizer=None, **backend_options) -> RetrievalParityReport:
    """``Blip2ForImageTextRetrieval`` vs a retrieval bundle: per-stage features, the ITC matrix, ITM logits
    of every (image, text) pair, and the rankings (ITC, then ITM re-ranking of the top k) both ways."""
    import torch


    model, tokenizer, processor = model_and_tokenizer or load_retrieval_checkpoint(checkpoint)
    model = model.float().eval()
    rt = RetrievalRuntime(bundle, precision=precision, backend=backend, **backend_options)
    warn_reference_drift(rt.manifest.versions)
    files = list(images) if images is not None else list_images(None)
    pil = [load_image(f) for f in files]
    texts = list(texts)
    t = THRESHOLDS[precision]
    rep = RetrievalParityReport(precision, backend, len(pil), len(texts), rerank_top_k, RETRIEVAL_TOLERANCE)

    # eager, as Blip2ForImageTextRetrieval.forward is called: <image> placeholders first when the config has one
    pv_ref = processor(pil, return_tensors="pt")["pixel_values"].float()
    nq, image_id = model.config.num_query_tokens, model.config.image_token_index
    prefix = [image_id] * nq if image_id is not None else []
    rows = [prefix + tokenizer(x).input_ids for x in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        itc_out = model(pixel_values=pv_ref, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        n, m = len(pil), len(texts)
        img_idx = torch.arange(n).repeat_interleave(m)
        txt_idx = torch.arange(m).repeat(n)
        itm_ref = model(pixel_values=pv_ref[img_idx], input_ids=ids[txt_idx], attention_mask=mask[txt_idx],
                        use_image_text_matching_head=True).logits_per_image.float().numpy()
        emb_ref = model.vision_model(pixel_values=pv_ref, return_dict=True).last_hidden_state.numpy()
    itc_ref = itc_out.logits_per_image.float().numpy()

    # runtime
    imgs = rt.encode_images(pil, names=[str(getattr(f, "filename", f)) for f in files])
    txts = rt.encode_texts(texts)
    rep.stages.append(_stage("preprocess", pv_ref.numpy(), preprocess(pil, rt.manifest.preprocess), THRESHOLDS["fp32"]))
    rep.stages.append(_stage("vision", emb_ref, imgs.embeds, t))
    rep.stages.append(_stage("image_feats", itc_out.image_embeds.float().numpy(), imgs.feats, t))
    rep.stages.append(_stage("text_feats", itc_out.text_embeds.float().numpy(), txts.feats, t))
    itc = rt.similarity(imgs, txts)
    pairs = [(i, j) for i in range(n) for j in range(m)]
    itm = rt.itm(imgs, txts, pairs)
    rep.itc_max_abs = float(np.abs(itc.astype(np.float64) - itc_ref).max())
    rep.itm_max_abs = float(np.abs(itm.astype(np.float64) - itm_ref).max())

    def order(matches):
        return [[mt.index for mt in row] for row in matches]

    rep.itc_rankings_equal = (order(rank(itc, 0, None)) == order(rank(itc_ref, 0, None))
                              and order(rank(itc.T, 0, None)) == order(rank(itc_ref.T, 0, None)))
    match_ref = itm_ref[:, 1].reshape(n, m)
    got = rt.retrieve(imgs, txts, rerank_top_k=rerank_top_k)
    ref_i2t = rank(itc_ref, rerank_top_k, lambda ps: np.array([match_ref[i, j] for i, j in ps]))
    ref_t2i = rank(itc_ref.T, rerank_top_k, lambda ps: np.array([match_ref[i, j] for j, i in ps]))
    rep.reranked_equal = order(got.i2t) == order(ref_i2t) and order(got.t2i) == order(ref_t2i)
    for i in range(min(2, n)):
        best = got.i2t[i][0]
        rep.examples.append(f"  [{imgs.names[i]}] best text: {texts[best.index]!r} (score {best.score:+.4f}, "
                            f"eager {ref_i2t[i][0].score:+.4f})")
    return rep
