"""Calibration data for int8: real inputs of every graph, recorded while the fp32 bundle runs.

The user's images (``--calib-images DIR``) and prompts (``--calib-prompts FILE``) go through the fp32
bundle with the ordinary runtime; each graph's runner is wrapped so that every call's feeds are kept:
pixel_values for ``vision``, image_embeds for ``qformer``, and for the decoder the prefill and several
decode steps (so the KV cache inputs are real too). No torch: this is the runtime running.

The decoder's keys and values are also summarized as they stream by (:attr:`CalibrationSet.kv_peak`:
the largest magnitude per head and channel over every call, before any thinning), which is what an
int8 KV cache needs for its scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends import RunnerWrapper
from runtime.contract import Family, GraphName
from runtime.errors import InputError
from runtime.manifest import load_manifest
from runtime.pipeline import Blip2Runtime
from runtime.preprocess import IMAGE_SUFFIXES, load_image
from runtime.retrieval import RetrievalRuntime

DEFAULT_CALIB_PROMPTS = ("", "a photo of", "Question: what is in the picture? Answer:",
                         "Question: how many people are there? Answer:")


def list_calibration_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files in ``folder`` (sorted); a clear error when the folder is missing, unreadable or empty."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"calibration folder not found: {folder}", hint="pass --calib-images DIR with images")
    if not folder.is_dir():
        raise InputError(f"--calib-images must be a folder of images, not a file: {folder}")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except PermissionError:
        raise InputError(f"calibration folder is not readable: {folder}") from None
    if not files:
        raise InputError(f"calibration folder {folder} has no images (jpg, png, ...)",
                         hint="add a few dozen images like the ones the model will see")
    return files[:limit] if limit else files


def read_prompts(path: str | Path | None) -> tuple[str, ...]:
    if path is None:
        return DEFAULT_CALIB_PROMPTS
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration prompts file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read calibration prompts {p}: {e}") from None
    if not lines:
        raise InputError(f"calibration prompts file {p} is empty (one prompt per line; an empty line = caption)")
    return tuple(lines)


@dataclass
class CalibrationSet:
    """Recorded feeds per graph name, in call order."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    # decoder: past.{i}.{key,value} -> [heads, head_dim] largest |value| cached over every call
    kv_peak: dict[str, np.ndarray] = field(default_factory=dict)
    # graph name -> the graph file that ran instead of the fp32 one (``LlmSide.graphs``)
    ran: dict[str, Path] = field(default_factory=dict)

    def count(self, graph: str) -> int:
        return len(self.feeds.get(graph, []))

    def observe_kv(self, outputs: dict[str, np.ndarray]) -> None:
        """Fold a decoder call's ``present.*`` (every cached position, the new ones included) into
        :attr:`kv_peak`."""
        for name, a in outputs.items():
            if not name.startswith("present.") or a.ndim != 4 or a.shape[2] == 0:
                continue
            key = "past." + name.removeprefix("present.")
            m = np.abs(a).max(axis=(0, 2))
            self.kv_peak[key] = m if key not in self.kv_peak else np.maximum(self.kv_peak[key], m)


class _Recorder(RunnerWrapper):
    """A graph runner that keeps a copy of every call's feeds, then runs the real one (and hands its
    outputs to ``observe``, if given). A decoder's cache goes through ``run`` (the copying path), so
    every step is recorded in the portable graph's IO."""

    def __init__(self, runner, sink: list, observe=None):
        super().__init__(runner)
        self.copying()
        self.sink = sink
        self.observe = observe

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self.runner.run(feeds)
        if self.observe is not None:
            self.observe(out)
        return out


@dataclass(frozen=True)
class LlmSide:
    """What the LLM side of a calibration runs. ``run`` False: nothing (no LLM graph is calibrated and no
    KV-cache scales are wanted). ``graphs``: graph name -> (folder, GraphRecord) of graphs the build has
    made already, run instead of the fp32 ones (their weight-only int8/int4 layers as MatMulNBits): an
    int8 build takes its KV-cache scales from its own int8 decoder, a quarter of the fp32 one's memory."""

    run: bool = True
    graphs: dict = field(default_factory=dict)


def collect(bundle: str | Path, images: list[Path], prompts: tuple[str, ...], *, decode_steps: int = 6,
            max_decoder_samples: int = 48, progress: bool = False, llm: LlmSide | None = None) -> CalibrationSet:
    """Run the fp32 bundle over ``images`` x ``prompts`` and record every graph's inputs.

    Images run one at a time (batch 1, the common edge case); the decoder sees each prompt's prefill
    and ``decode_steps`` decode steps. Decoder samples are thinned evenly to ``max_decoder_samples``
    (prefills are always kept: they carry the visual prefix). ``llm``: what the LLM side runs
    (:class:`LlmSide`; default the fp32 graphs).
    """

    llm_side = llm or LlmSide()
    if load_manifest(bundle, verify=False).family is Family.RETRIEVAL:
        return _collect_retrieval(bundle, images, prompts, progress=progress)
    rt = Blip2Runtime(bundle, precision="fp32", backend="ort", lower_weights=True)
    cal = CalibrationSet()
    vision = (GraphName.VISION, GraphName.QFORMER)

    def record(names) -> None:
        for name in names:
            sink: list = cal.feeds.setdefault(name.value, [])
            observe = cal.observe_kv if name is GraphName.DECODER else None
            rt.wrap_graph(name, functools.partial(_Recorder, sink=sink, observe=observe))

    record(vision)
    it: list[Path] = list(images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrate", unit="image")
    # The image side runs first and is unloaded before the LLM loads, so the two are never in memory
    # together (the calibration peak is the larger of them, not their sum: #13).
    prefixes = [rt.image_features([load_image(path)]) for path in it]  # a bad image stops here
    for name in vision:
        rt.release_graph(name)
    if not llm_side.run:
        return cal
    llm_graphs = [g for g in rt.manifest.required_graphs() if g not in vision]
    for name in llm_graphs:
        if name.value in llm_side.graphs:
            folder, rec = llm_side.graphs[name.value]
            rt.use_graph(name, folder, rec)
            cal.ran[name.value] = Path(folder) / rec.file
    record(llm_graphs)
    # Both LLM families generate (the T5 encoder, cross K/V and decoder feeds are what int4's GPTQ needs).
    if GraphName.DECODER in llm_graphs or GraphName.SEQ2SEQ_DECODER in llm_graphs:
        for prefix in prefixes:
            for p in prompts:
                rt.generate(prompts=[p], prefix=prefix, max_new_tokens=decode_steps, min_new_tokens=decode_steps)
    for step_graph in (GraphName.DECODER.value, GraphName.SEQ2SEQ_DECODER.value):
        if step_graph in cal.feeds:
            cal.feeds[step_graph] = _thin(cal.feeds[step_graph], max_decoder_samples)
    return cal


def _collect_retrieval(bundle: str | Path, images: list[Path], prompts: tuple[str, ...], *,
                       progress: bool = False, itm_texts_per_image: int = 4) -> CalibrationSet:
    """Retrieval bundles: image features of every image, text features of every prompt (the captions to
    rank), and the ITM head over every image x prompt pair."""

    rt = RetrievalRuntime(bundle, precision="fp32", backend="ort")
    cal = CalibrationSet()
    for name in rt.manifest.required_graphs():
        sink = cal.feeds.setdefault(name.value, [])
        rt.wrap_graph(name, functools.partial(_Recorder, sink=sink))
    texts = rt.encode_texts([p for p in prompts if p.strip()] or ["a photo"])
    it: list[Path] = list(images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibrate", unit="image")
    n = len(texts.texts)
    for k, path in enumerate(it):
        imgs = rt.encode_images([load_image(path)])
        # ITM sees each image with a few captions (its own-index one and neighbours), not all n of them
        rt.itm(imgs, texts, [(0, (k + j) % n) for j in range(min(itm_texts_per_image, n))])
    return cal


def _thin(samples: list[dict[str, np.ndarray]], limit: int) -> list[dict[str, np.ndarray]]:
    """Keep every prefill (no past) and an even spread of decode steps, ``limit`` in all."""
    if len(samples) <= limit:
        return samples
    prefills = [i for i, s in enumerate(samples) if s.get("past.0.key") is None or s["past.0.key"].shape[2] == 0]
    steps = [i for i in range(len(samples)) if i not in set(prefills)]
    room = max(limit - len(prefills), 0)
    if room and steps:
        picks = np.linspace(0, len(steps) - 1, num=min(room, len(steps))).round().astype(int)
        steps = [steps[i] for i in sorted(set(picks.tolist()))]
    else:
        steps = []
    keep = sorted(set(prefills[:limit]) | set(steps))
    return [samples[i] for i in keep]
