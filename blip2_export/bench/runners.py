"""The timed subjects: a bundle on a runtime backend, and the eager transformers model (and its peers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blip2_export.bench.config import EAGER_PEERS, STAGES, BackendUnavailable
from blip2_export.bench.measure import onnx_weight_bytes
from blip2_export.graphs import QFormerGraph
from blip2_export.modelzoo import load_checkpoint
from runtime.backends import backend_spec
from runtime.contract import GraphName
from runtime.decoder_only import DecoderOnlyModel
from runtime.errors import Blip2Error
from runtime.generation import GenerationConfig
from runtime.pipeline import Blip2Runtime


@dataclass
class Timings:
    """Seconds per stage, over every measured run."""

    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, **kw: float | list[float]) -> None:
        for k, v in kw.items():
            self.stages[k].extend(v if isinstance(v, list) else [v])


class _Clock:
    """Marks times of streamed tokens: the first mark ends prefill, the gaps are decode steps."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, *_args) -> None:
        self.marks.append(time.perf_counter())


class RuntimeRunner:
    """A bundle on a runtime backend (ORT or TensorRT), timed through its public API."""

    def __init__(self, bundle: Path, kind: str, precision: str, threads: int, device: str = "cpu",
                 int8_kernel: str = "auto"):

        takes = backend_spec(kind).options
        opts: dict[str, Any] = {k: v for k, v in (("threads", threads), ("int8_kernel", int8_kernel)) if k in takes}
        if kind == "ort" and device == "cuda":
            opts["providers"] = ["CUDAExecutionProvider"]
        self.rt = Blip2Runtime(bundle, precision=precision, backend=kind, verify=False, **opts)
        self.facts = self.rt.manifest.model
        self.decoder = self.rt.graph(GraphName.DECODER)
        self.rt.graph(GraphName.VISION)
        self.rt.graph(GraphName.QFORMER)
        self.prefix: np.ndarray | None = None

    def describe(self) -> dict:
        rec, facts = self.decoder.record, self.decoder.facts
        int8 = self.rt.graph(GraphName.VISION).facts.int8
        return {"decoder_file": facts.file, "kv_cache": facts.kv_cache,
                **({"int8_kernel": int8.kernel.value} if int8 is not None else {}),
                "weight_bytes": onnx_weight_bytes(self.rt.bundle / facts.file),
                "kv_itemsize": np.dtype(facts.kv_dtype or rec.io.inputs[0].dtype).itemsize}

    def e2e(self, images: list, prompt: str, new_tokens: int, t: Timings | None) -> list[list[int]]:

        cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        clock = _Clock()
        t0 = time.perf_counter()
        pv = self.rt.pixel_values(images)
        t1 = time.perf_counter()
        emb = self.rt.image_embeds(pv)
        t2 = time.perf_counter()
        prefix = self.rt.graph(GraphName.QFORMER).run({"image_embeds": emb})["visual_prefix"]
        t3 = time.perf_counter()
        gens = self.rt.generate(prompts=[prompt] * len(images), prefix=prefix, config=cfg, stream=clock)
        t4 = time.perf_counter()
        self.prefix = prefix
        if t is not None:
            m = clock.marks
            t.add(preprocess=t1 - t0, vision=t2 - t1, qformer=t3 - t2, prefill=m[0] - t3,
                  decode_per_token=list(np.diff(m)), e2e=t4 - t0)
        return [g.token_ids for g in gens]

    def decode_at(self, context: int, batch: int, steps: int, token: int) -> list[float]:
        """Seconds per decode step with ``context`` positions cached, ``batch`` rows."""

        q = self.facts.num_query_tokens
        assert self.prefix is not None
        prefix = np.repeat(self.prefix[:1], batch, axis=0)
        embed = self.rt.embed
        assert embed is not None
        sm = DecoderOnlyModel(self.rt.manifest, self.decoder, embed, prefix,
                              [[token] * (context - q)] * batch, max_new_tokens=steps + 2)
        _, state = sm.prefill()
        toks = np.full(batch, token, dtype=np.int64)
        times = []
        for i in range(steps + 2):
            s = time.perf_counter()
            _, state = sm.step(toks, state)
            if i >= 2:
                times.append(time.perf_counter() - s)
        return times


class EagerRunner:
    """transformers ``Blip2ForConditionalGeneration``, stages timed by forward hooks: torch fp32 on the
    CPU, or fp16 on the GPU (``device="cuda"``; the Q-Former stays fp32 as transformers keeps it), with
    the device synchronized at every time mark."""

    def __init__(self, checkpoint: Path, threads: int, device: str = "cpu", variant: str = "fp32"):
        import torch


        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.cuda = device == "cuda"
        self.variant = variant
        if variant not in ("fp32", *EAGER_PEERS.values()):
            raise Blip2Error(f"unknown eager variant {variant!r}")
        if variant != "fp32" and self.cuda:
            raise BackendUnavailable(f"the {variant} eager peer is a CPU one; bench it with --device cpu")
        self.model, self.tokenizer, self.processor = load_checkpoint(
            checkpoint, dtype="float16" if self.cuda else "float32")
        self.model = self.model.to(device).eval()
        self.dtype = torch.float16 if self.cuda else torch.float32
        cfg = self.model.config
        if not cfg.use_decoder_only_language_model:
            raise Blip2Error("bench times decoder-only (OPT) models only")
        if variant == "dynint8":  # the one line a CPU user tries first, on every Linear
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        elif variant == "compile":
            self._compile()
        self.nq, self.image_id = cfg.num_query_tokens, cfg.image_token_index
        self.marks: dict[str, float] = {}
        for name, mod, when in (("vision_start", self.model.vision_model, "pre"),
                                ("vision_end", self.model.vision_model, "post"),
                                ("qformer_end", self.model.language_projection, "post")):
            self._hook(mod, name, when)
        self.prefix: Any = None

    def _compile(self) -> None:
        """``torch.compile`` the LLM's forward (what generate calls every step), checked on a short input
        here so that a machine where it cannot work (no C++ compiler, ...) says so instead of failing later."""
        torch = self.torch
        lm = self.model.language_model
        lm.forward = torch.compile(lm.forward, dynamic=True)
        try:
            with torch.no_grad():
                lm(inputs_embeds=torch.zeros(1, 3, lm.config.hidden_size))
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds
            raise BackendUnavailable(f"torch.compile does not work here: {str(e).splitlines()[0][:160]}") from None

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _hook(self, module, name: str, when: str) -> None:
        def mark(*_a, **_k):
            self._sync()
            self.marks[name] = time.perf_counter()

        if when == "pre":
            module.register_forward_pre_hook(mark)
        else:
            module.register_forward_hook(mark)

    def describe(self) -> dict:
        lm = self.model.language_model
        emb = {id(p) for m in lm.modules() if isinstance(m, self.torch.nn.Embedding) for p in m.parameters()}
        weights = sum(p.numel() * p.element_size() for p in lm.parameters() if id(p) not in emb)
        for m in lm.modules():  # dynamic int8 Linear layers keep their packed weights outside parameters()
            if isinstance(m, self.torch.ao.nn.quantized.dynamic.Linear):
                w, b = m.weight(), m.bias()
                weights += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        return {"decoder_file": None, "kv_cache": "transformers DynamicCache", "weight_bytes": int(weights),
                "kv_itemsize": 2 if self.cuda else 4, "eager_variant": self.variant}

    def e2e(self, images: list, prompt: str, new_tokens: int, t: Timings | None) -> list[list[int]]:
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        clock = _Clock()
        sync = self._sync

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):  # called with the prompt first, then once per new token
                if self.first:
                    self.first = False
                    return
                sync()
                clock()

            def end(self):
                pass

        t0 = time.perf_counter()
        pv = self.processor(images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        self._sync()
        t1 = time.perf_counter()
        ids = torch.tensor([[self.image_id] * self.nq + self.tokenizer(prompt).input_ids] * len(images),
                           device=self.device)
        with torch.no_grad():
            out = self.model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      num_beams=1, streamer=Streamer())
        gen = out[:, ids.shape[1]:]
        self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        t4 = time.perf_counter()
        if t is not None:
            m = clock.marks
            t.add(preprocess=t1 - t0, vision=self.marks["vision_end"] - self.marks["vision_start"],
                  qformer=self.marks["qformer_end"] - self.marks["vision_end"],
                  prefill=m[0] - self.marks["qformer_end"], decode_per_token=list(np.diff(m)), e2e=t4 - t0)
        if self.prefix is None:  # the visual prefix of the first image, for the decode sweep

            with torch.no_grad():
                self.prefix = QFormerGraph(self.model)(self.model.vision_model(pixel_values=pv[:1]).last_hidden_state)
                self.prefix = self.prefix.to(self.dtype)
        return gen.tolist()

    def decode_at(self, context: int, batch: int, steps: int, token: int) -> list[float]:
        torch = self.torch
        lm = self.model.language_model
        embed = lm.get_input_embeddings()
        dev = self.device
        with torch.no_grad():
            prefix = self.prefix.expand(batch, -1, -1)
            ids = torch.full((batch, context - self.nq), token, dtype=torch.long, device=dev)
            x = torch.cat([prefix, embed(ids)], dim=1)
            out = lm(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=dev),
                     use_cache=True)
            past, n = out.past_key_values, x.shape[1]
            step_in = embed(torch.full((batch, 1), token, dtype=torch.long, device=dev))
            times = []
            for i in range(steps + 2):
                self._sync()
                s = time.perf_counter()
                out = lm(inputs_embeds=step_in, attention_mask=torch.ones((batch, n + 1), dtype=torch.long, device=dev),
                         past_key_values=past, use_cache=True)
                self._sync()
                past, n = out.past_key_values, n + 1
                if i >= 2:
                    times.append(time.perf_counter() - s)
        return times


