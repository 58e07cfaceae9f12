"""One bench run: load every backend, interleave the measured rounds, summarise into a report."""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from blip2_export.bench.config import BackendUnavailable, BenchConfig, backend_int8_kernel, parse_backend
from blip2_export.bench.measure import (
    PeakMemory,
    cuda_torch,
    gpu_memory_bandwidth,
    kv_bytes,
    machine_info,
    memory_bandwidth,
    percentiles,
)
from blip2_export.bench.report import BenchReport, evaluate_targets
from blip2_export.bench.runners import EagerRunner, RuntimeRunner, Timings
from blip2_export.parity import list_images
from runtime.errors import Blip2Error, require
from runtime.manifest import load_manifest


def _unavailable(kind: str, precision: str, bundle: Path, checkpoint: Path | None,
                 device: str = "cpu") -> str | None:
    """Why backend (kind, precision) cannot run here, or None."""
    if kind == "eager":
        if checkpoint is None or not (Path(checkpoint) / "config.json").is_file():
            return f"no checkpoint at {checkpoint} (eager needs MODEL_DIR)"
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return "not available here: torch/transformers not installed"
        return None
    if kind == "ort" and device == "cuda":
        ort = require("onnxruntime", "cpu")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("not available here: this onnxruntime has no CUDAExecutionProvider "
                    "(pip install 'blip2-export[gpu]')")
    if kind == "trt":
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            trt = None
        if trt is None or not hasattr(trt, "Builder"):  # an empty namespace package is not TensorRT
            return "not available here: tensorrt not installed"
        if importlib.util.find_spec("runtime.backends.trt") is None:
            return "not available here: this build has no TensorRT runtime backend"
        if device == "cpu":
            return "TensorRT runs on the GPU: bench it with --device cuda (beside the fp16 GPU eager baseline)"

    m = load_manifest(bundle, verify=False)
    if precision not in m.graphs:
        return (f"bundle has no {precision} graphs (it has: {', '.join(m.precisions())}); "
                f"run 'blip2-export build BUNDLE --precision {precision}'")
    return None


def run_bench(checkpoint: str | Path | None, bundle: str | Path, config: BenchConfig, *, images: list | None = None,
              echo: Callable[[str], None] | None = None) -> BenchReport:
    """Run every backend of ``config`` and return the report (see :func:`write_report`)."""

    config.validate()
    if config.device == "cuda":
        cuda_torch()  # fails in one line, before any long work, where there is no usable GPU
    bundle = Path(bundle)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    manifest = load_manifest(bundle, verify=False)  # the runtime checks each file it reads
    facts = manifest.model
    ctx_limit = facts.max_context - config.decode_steps - 2
    bad = [c for c in config.contexts if not facts.num_query_tokens + 1 <= c <= ctx_limit]
    if bad:
        raise Blip2Error(f"--contexts {bad} outside [{facts.num_query_tokens + 1}, {ctx_limit}] for this bundle "
                         f"(context {facts.max_context}, {facts.num_query_tokens} visual tokens)",
                         hint="lower --contexts or export the bundle with a larger --max-context")
    manifest.dims["batch"].check("batch", max(config.batches), "--max-batch")
    threads = config.thread_count
    images = list(images) if images is not None else list_images(None, max(config.batches))
    while len(images) < max(config.batches):
        images = images + images
    token = facts.bos_token_id if facts.bos_token_id is not None else 5

    report = BenchReport(
        machine=machine_info(config.device, config.int8_kernel),
        load_average_start=list(os.getloadavg()),
        settings={**asdict(config), "threads": threads, "bundle": str(bundle),
                  "checkpoint": str(checkpoint) if checkpoint else None},
        model={"llm": facts.llm_type, "llm_layers": facts.llm_layers, "llm_hidden": facts.llm_hidden,
               "vocab": facts.vocab_size, "image_size": facts.image_size, "vision_hidden": facts.vision_hidden,
               "num_query_tokens": facts.num_query_tokens, "max_context": facts.max_context},
    )
    runs_per_round = len(config.batches) * (1 + len(config.contexts))
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(config.backends) * runs_per_round * (config.warmup + config.repeats), unit="run",
                   desc="bench")
    results: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    # 1. load each backend and run its warm-up alone, so its memory can be attributed to it
    for spec in config.backends:
        kind, prec = parse_backend(spec)
        reason = _unavailable(kind, prec, bundle, checkpoint, config.device)
        if reason is not None:
            results[spec] = {"status": "skipped", "reason": reason}
            if echo:
                echo(f"{spec}: skipped ({reason})")
            if bar is not None:
                bar.update(runs_per_round * (config.warmup + config.repeats))
            continue
        if bar is not None:
            bar.set_description(f"load {spec}")
        try:
            runners[spec], results[spec] = _load_backend(kind, prec, checkpoint, bundle, config, images, token,
                                                         bar, backend_int8_kernel(spec, config.int8_kernel))
        except BackendUnavailable as e:
            results[spec] = {"status": "skipped", "reason": str(e)}
            if echo:
                echo(f"{spec}: skipped ({e})")
            if bar is not None:
                bar.update(runs_per_round * (config.warmup + config.repeats))
    # 2. measured rounds: every backend, batch and context once per round, backends interleaved, so slow
    # drifts and bursts of load from other processes spread over all of them instead of skewing one ratio
    def measure_bandwidth() -> float:
        return gpu_memory_bandwidth() if config.device == "cuda" else memory_bandwidth(threads)

    bandwidth = [measure_bandwidth()]  # sampled again after each round; the roofline uses the best
    timings = {spec: {b: Timings() for b in config.batches} for spec in runners}
    sweep = {spec: {(b, c): [] for b in config.batches for c in config.contexts} for spec in runners}
    for _ in range(config.repeats):
        for spec, runner in runners.items():
            if bar is not None:
                bar.set_description(spec)
            for batch in config.batches:
                runner.e2e(images[:batch], config.prompt, config.new_tokens, timings[spec][batch])
                if bar is not None:
                    bar.update(1)
            for (batch, ctx), times in sweep[spec].items():
                times += runner.decode_at(ctx, batch, config.decode_steps, token)
                if bar is not None:
                    bar.update(1)
        bandwidth.append(measure_bandwidth())
    if bar is not None:
        bar.close()
    for spec in runners:
        _summarise(results[spec], timings[spec], sweep[spec], config, facts)
    runners.clear()
    gc.collect()
    report.bandwidth_samples_gb_s = [b / 1e9 for b in bandwidth]
    report.bandwidth_gb_s = max(bandwidth) / 1e9
    _roofline(results, facts, max(bandwidth))
    report.backends = results
    report.load_average_end = list(os.getloadavg())
    _ratios(results)
    report.targets = evaluate_targets(results, arch=report.machine.get("arch", ""), device=config.device)
    return report


def _load_backend(kind, prec, checkpoint, bundle, config: BenchConfig, images, token, bar,
                  int8_kernel: str = "auto") -> tuple[Any, dict]:
    """Load a backend and run its warm-up (every batch and context), measuring the memory it adds."""
    gc.collect()
    with PeakMemory(gpu=config.device == "cuda") as mem:
        runner: Any = (EagerRunner(checkpoint, config.thread_count, config.device, prec) if kind == "eager"
                       else RuntimeRunner(bundle, kind, prec, config.thread_count, config.device, int8_kernel))
        for _ in range(config.warmup):
            for batch in config.batches:
                runner.e2e(images[:batch], config.prompt, config.new_tokens, None)
                if bar is not None:
                    bar.update(1)
                for ctx in config.contexts:
                    runner.decode_at(ctx, batch, config.decode_steps, token)
                    if bar is not None:
                        bar.update(1)
        if config.warmup == 0:  # still one run, for the visual prefix the decode sweep uses
            runner.e2e(images[:1], config.prompt, 2, None)
    info = runner.describe()
    out: dict[str, Any] = {"status": "ok", "precision": "fp16" if kind == "eager" and config.device == "cuda"
                           else prec, "device": config.device, **info,
                           "peak_rss_mb": mem.peak / 2**20, "peak_growth_mb": (mem.peak - mem.baseline) / 2**20}
    if config.device == "cuda":
        out["gpu_peak_mb"] = mem.gpu_peak / 2**20
        out["gpu_peak_growth_mb"] = (mem.gpu_peak - mem.gpu_baseline) / 2**20
    return runner, out


def _summarise(out: dict, timings: dict, sweep: dict, config: BenchConfig, facts) -> None:
    out["e2e"], out["decode_sweep"] = {}, []
    for batch, t in timings.items():
        stages = {s: percentiles(v) for s, v in t.stages.items()}
        out["e2e"][str(batch)] = {
            "stages_ms": stages,
            "tokens_per_s": batch * config.new_tokens / (stages["e2e"]["p50"] / 1000.0),
            "decode_tokens_per_s": batch / (stages["decode_per_token"]["p50"] / 1000.0),
        }
    for (batch, ctx), times in sweep.items():
        need = out["weight_bytes"] + kv_bytes(facts, ctx, batch, out["kv_itemsize"])
        out["decode_sweep"].append({"batch": batch, "context": ctx, "ms": percentiles(times), "bytes_per_step": need})


def _roofline(results: dict, facts, bandwidth: float) -> None:
    for r in results.values():
        for sw in r.get("decode_sweep", []):
            sw["roofline_ms"] = sw["bytes_per_step"] / bandwidth * 1000.0
            sw["roofline_fraction"] = sw["roofline_ms"] / sw["ms"]["p50"]
            sw["roofline_fraction_best"] = sw["roofline_ms"] / sw["ms"]["min"]


def _ratios(backends: dict[str, dict]) -> None:
    eager = backends.get("eager", {})
    for r in backends.values():
        if r.get("status") != "ok":
            continue
        for batch, e in r["e2e"].items():
            base = eager.get("e2e", {}).get(batch) if eager.get("status") == "ok" else None
            e["e2e_vs_eager"] = e["stages_ms"]["e2e"]["p50"] / base["stages_ms"]["e2e"]["p50"] if base else None
        sweep = [s for s in r["decode_sweep"] if s["batch"] == min(x["batch"] for x in r["decode_sweep"])]
        if len(sweep) >= 2:
            lo, hi = sweep[0], sweep[-1]
            r["context_growth"] = {"from": lo["context"], "to": hi["context"], "ratio": hi["ms"]["p50"] / lo["ms"]["p50"],
                                   "ratio_best": hi["ms"]["min"] / lo["ms"]["min"]}


