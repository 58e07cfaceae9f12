"""Run a bundle: images -> visual prefix -> LLM generation, on any backend.

    rt = Blip2Runtime("bundle/")
    rt.caption("cat.jpg")
    rt.generate(["a.jpg", "b.jpg"], ["Question: what is this? Answer:", ""], GenerationConfig(num_beams=3))
    prefix = rt.image_features(["frame.jpg"])          # once per frame ...
    rt.generate(prefix=prefix, prompts=["q1", "q2"])   # ... reused across prompts

The runtime needs numpy, tokenizers and one backend (onnxruntime or TensorRT): no torch, no
transformers. One instance can serve many threads: graph sessions are shared (ORT sessions are
thread-safe for ``run``) and all per-request state (KV cache, masks) lives on the caller's stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.bundle_files import BundleFiles
from runtime.bundle_runtime import BundleRuntime
from runtime.contract import Family, GraphName
from runtime.deadline import DEFAULT_TIMEOUT_S, deadline
from runtime.errors import Blip2Error, InputError
from runtime.families import runtime_family, step_model
from runtime.generation import GenerationConfig, StreamCallback, generate
from runtime.preprocess import ImageLike, preprocess
from runtime.text import load_table


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finished: bool  # ended on a stop token (else max_new_tokens was reached)


class Blip2Runtime(BundleRuntime):
    """Captions and answers about images with a generative bundle (decoder-only or encoder-decoder LLM).
    ``timeout``: wall-clock seconds each call (generate, image_features, ...) may take (None: no limit)."""

    def __init__(self, bundle: str | Path, *, precision: str = "fp32", backend: str = "ort",
                 verify: bool = True, timeout: float | None = DEFAULT_TIMEOUT_S, **backend_options):
        super().__init__(bundle, precision=precision, backend=backend, verify=verify, timeout=timeout,
                         **backend_options)
        # T5 shares one table between encoder and decoder, unless the exporter found an untied one
        self.dec_embed = load_table(BundleFiles(self.bundle, verify=verify), self.manifest, "decoder_embed_tokens")

    def check_family(self, family: Family) -> None:
        if family is Family.RETRIEVAL:
            raise Blip2Error(f"{self.bundle} is a retrieval bundle: it ranks images against texts and does not "
                             "generate", hint="use 'blip2-export retrieve' or runtime.retrieval.RetrievalRuntime")

    # -- stages ------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[ImageLike]) -> np.ndarray:
        return preprocess(list(images), self.manifest.preprocess)

    def _check_batch(self, n: int) -> None:
        if n < 1:
            raise InputError("no images given")
        self.manifest.dims["batch"].check("batch", n, "--max-batch")

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        self._check_batch(pixel_values.shape[0])
        return self.graph(GraphName.VISION).run({"pixel_values": pixel_values})["image_embeds"]

    def image_features(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Visual prefix [B, num_query_tokens, llm_hidden] (vision + Q-Former + projection).

        ``images`` may also be preprocessed pixel_values [B,3,H,W]."""
        with deadline(self.timeout):
            pv = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.pixel_values(images)
            embeds = self.image_embeds(pv)
            return self.graph(GraphName.QFORMER).run({"image_embeds": embeds})["visual_prefix"]

    # -- generation --------------------------------------------------------------------------------
    def generation_config(self, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
        if config is None:
            g = self.manifest.generation
            config = GenerationConfig(max_new_tokens=g.max_new_tokens, num_beams=g.num_beams,
                                      do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k,
                                      top_p=g.top_p, repetition_penalty=g.repetition_penalty,
                                      length_penalty=g.length_penalty)
        return config.with_(**overrides).validate()

    def encode_prompts(self, prompts: Sequence[str], config: GenerationConfig) -> list[list[int]]:
        """Token ids of each prompt, checked against the bundle's limits for ``config.max_new_tokens``."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        check = runtime_family(self.family).check_prompt
        for i in ids:
            if check is not None:
                check(self.manifest, i, config.max_new_tokens)
        return ids

    def generate(self, images: Sequence[ImageLike] | None = None, prompts: Sequence[str] | str | None = None,
                 config: GenerationConfig | None = None, *, prefix: np.ndarray | None = None,
                 stream: StreamCallback | None = None, **overrides) -> list[Generation]:
        """Generate for a batch. ``prompts`` may be one string (used for every image) or one per image.

        Pass ``prefix`` (from :meth:`image_features`) instead of ``images`` to reuse image features; a
        prefix with one row is shared by every prompt. The whole call runs under ``timeout``.
        """
        with deadline(self.timeout):
            return self._generate(images, prompts, config, prefix, stream, overrides)

    def _generate(self, images, prompts, config, prefix, stream, overrides) -> list[Generation]:
        config = self.generation_config(config, **overrides)
        if prefix is None:
            if images is None:
                raise InputError("give images or a precomputed prefix")
            prefix = self.image_features(images)
        n = prefix.shape[0]
        if prompts is None:
            prompts = [""] * n
        elif isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if n == 1 and len(prompts) > 1:
            prefix = np.repeat(prefix, len(prompts), axis=0)
            n = len(prompts)
        if len(prompts) != n:
            raise InputError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
        self._check_batch(n)
        if config.num_beams > 1:
            self.manifest.dims["batch"].check("batch x num_beams", n * config.num_beams, "--max-batch")
        exp = (self.manifest.model.num_query_tokens, self.manifest.model.llm_hidden)
        if prefix.ndim != 3 or tuple(prefix.shape[1:]) != exp:
            raise Blip2Error(f"visual prefix of shape {tuple(prefix.shape)}; the model facts give "
                             f"[batch, {exp[0]}, {exp[1]}]", hint="the bundle's Q-Former does not match its "
                                                                 "manifest: re-export the bundle")
        ids = self.encode_prompts(prompts, config)
        model = self.step_model(prefix, ids, config.max_new_tokens)
        m = self.manifest.model
        seqs = generate(model, config, eos_token_ids=m.eos_token_ids, pad_token_id=m.pad_token_id, stream=stream)
        return [Generation(self.tokenizer.decode(s.token_ids).strip(), s.token_ids, s.finished) for s in seqs]

    def step_model(self, prefix: np.ndarray, prompt_ids: list[list[int]], max_new_tokens: int | None = None):
        """The family's step model (:mod:`runtime.families`) for one batch of (visual prefix, prompt ids)."""
        return step_model(self, prefix, prompt_ids, max_new_tokens)

    def embed_table(self) -> np.ndarray:
        if self.embed is None:
            raise Blip2Error("bundle has no token embedding table")
        return self.embed

    def caption(self, image: ImageLike, prompt: str = "", **overrides) -> str:
        return self.generate([image], [prompt], **overrides)[0].text

    def ask(self, image: ImageLike, prompts: Sequence[str], **overrides) -> list[str]:
        """Several prompts about one image: vision and Q-Former run once."""
        prefix = self.image_features([image])
        return [g.text for g in self.generate(prompts=list(prompts), prefix=prefix, **overrides)]

