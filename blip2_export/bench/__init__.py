"""``blip2-export bench``: the eager model and every bundle backend, timed side by side in one run.

For each backend (``eager``: transformers ``Blip2ForConditionalGeneration.generate``, torch fp32 on
CPU; ``ort-fp32|fp16|int8``: the bundle on ONNX Runtime; ``trt-*``: TensorRT) and each batch size,
on the same images and prompt, with ``min_new_tokens = max_new_tokens`` so every run generates the
same number of tokens:

* stage timings, warm-up then repeated runs, p50/p90/p99: preprocess, vision, qformer (with the
  language projection), prefill (time to the first token), per-token decode, end to end; tokens/s;
  the process's peak resident memory while the backend loaded and warmed up (and its growth);
* per-token decode as the cache grows (``contexts``) and with batch (``batches``);
* a roofline per decode step: bytes of LLM weights (embedding tables excluded: a step reads one row)
  plus KV cache at that context, divided by the memory bandwidth measured on the spot, and the
  fraction of it achieved.

All backends stay loaded and the measured rounds interleave them (every backend, batch and context
once per round), so load from other processes and slow drifts spread over all backends instead of
skewing one ratio. Writes ``report.json``, ``report.md`` (the tables) and ``report.png`` into the
output folder, each through a temporary file. The report carries the load average before and after:
on a shared machine only ratios measured in one run mean something.

The package: :mod:`~blip2_export.bench.config` (settings, backend specs), :mod:`~blip2_export.bench.measure`
(instruments), :mod:`~blip2_export.bench.runners` (what is timed), :mod:`~blip2_export.bench.run` (the
interleaved rounds), :mod:`~blip2_export.bench.report` (the :class:`BenchReport` dataclass, targets, files),
:mod:`~blip2_export.bench.render` (Markdown, plot), :mod:`~blip2_export.bench.model` (the bench model).
"""

from blip2_export.bench.config import (
    BACKEND_KINDS,
    DEFAULT_BACKENDS,
    EAGER_PEERS,
    PRECISIONS,
    STAGES,
    BackendUnavailable,
    BenchConfig,
    parse_backend,
)
from blip2_export.bench.measure import (
    kv_bytes,
    machine_info,
    memory_bandwidth,
    onnx_weight_bytes,
    percentiles,
)
from blip2_export.bench.model import build_bench_model
from blip2_export.bench.render import plot, render_markdown, write_report
from blip2_export.bench.report import (
    PEER_TARGETS,
    TARGETS,
    BenchReport,
    Target,
    evaluate_targets,
)
from blip2_export.bench.run import run_bench

__all__ = ["BACKEND_KINDS", "DEFAULT_BACKENDS", "EAGER_PEERS", "PEER_TARGETS", "PRECISIONS", "STAGES", "TARGETS",
           "BackendUnavailable", "BenchConfig", "BenchReport", "Target", "build_bench_model", "evaluate_targets",
           "kv_bytes", "machine_info", "memory_bandwidth", "onnx_weight_bytes", "parse_backend", "percentiles", "plot",
           "render_markdown", "run_bench", "write_report"]
