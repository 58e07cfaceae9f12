"""The report as files: JSON, Markdown tables and a PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from blip2_export.bench.report import BenchReport
from runtime.errors import require
from runtime.integrity import atomic_write_text


def render_markdown(report: BenchReport) -> str:
    m, s, md = report.machine, report.settings, report.model
    la0, la1 = report.load_average_start, report.load_average_end
    cuda = s.get("device") == "cuda"
    gpu = (f" GPU: {m.get('gpu')} ({m.get('gpu_memory_gb')} GB), CUDA {m.get('cuda')}; eager runs fp16 on it "
           "(Q-Former fp32), ort-* on ONNX Runtime's CUDA provider." if cuda else "")
    bw = ("GPU memory bandwidth measured now (device-to-device copy, read + write; "
          if cuda else "Memory bandwidth measured now (best of a copy, read + write, and a read; ")
    lines = [
        "## blip2-export bench",
        "",
        (f"Machine: {m.get('cpu')} ({m.get('cpu_class', '?')}: {' '.join(m.get('cpu_features', [])) or '-'}), "
         f"{m.get('cores')} cores, {m.get('ram_gb', '?')} GB RAM, {m.get('platform')}; "
         + (f"int8 kernel form {m['int8_kernel']}; " if m.get("int8_kernel") else "") +
         f"onnxruntime {m.get('onnxruntime', '-')}, torch {m.get('torch', '-')}, transformers "
         f"{m.get('transformers', '-')}.{gpu} Threads: {s['threads']} (torch and ORT). Load average "
         f"{la0[0]:.1f} at start, {la1[0]:.1f} at end. {bw}"
         f"best of {len(report.bandwidth_samples_gb_s)} samples taken between rounds): "
         f"{report.bandwidth_gb_s:.1f} GB/s."),
        "",
        (f"Model: {md['llm']} LLM, {md['llm_layers']} layers x {md['llm_hidden']}, vocab {md['vocab']}; "
         f"vision {md['image_size']} px x {md['vision_hidden']}. Prompt {s['prompt']!r}, {s['new_tokens']} new "
         f"tokens (min = max), {s['warmup']} warm-up + {s['repeats']} measured rounds, backends interleaved "
         f"round by round. Peak RSS{' and GPU memory' if cuda else ''}: while the backend loaded and warmed up "
         f"(growth: over the figure before)."),
        "",
        "### End to end (milliseconds, p50 unless noted)",
        "",
        ("| backend | batch | preprocess | vision | qformer | prefill | decode/token p50 (p90, p99) "
         f"| e2e p50 (p90, p99) | tokens/s | peak RSS MB (+growth){'; GPU MB (+growth)' if cuda else ''} "
         "| e2e vs eager |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for spec, r in report.backends.items():
        if r.get("status") != "ok":
            skipped.append(f"- `{spec}`: skipped, {r['reason']}")
            continue
        for batch, e in r["e2e"].items():
            st = e["stages_ms"]
            d, t = st["decode_per_token"], st["e2e"]
            ratio = e.get("e2e_vs_eager")
            lines.append(
                f"| {spec} | {batch} | {st['preprocess']['p50']:.1f} | {st['vision']['p50']:.1f} | "
                f"{st['qformer']['p50']:.1f} | {st['prefill']['p50']:.1f} | {d['p50']:.1f} ({d['p90']:.1f}, "
                f"{d['p99']:.1f}) | {t['p50']:.0f} ({t['p90']:.0f}, {t['p99']:.0f}) | {e['tokens_per_s']:.1f} | "
                f"{r['peak_rss_mb']:.0f} (+{r['peak_growth_mb']:.0f})"
                + (f"; {r['gpu_peak_mb']:.0f} (+{r['gpu_peak_growth_mb']:.0f})" if "gpu_peak_mb" in r else "")
                + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "### Per-token decode vs context and batch (roofline = bytes read per step / bandwidth)", "",
              ("| backend | batch | context | decode ms p50 (p90, best) | MB read/step | roofline ms "
              "| achieved fraction p50 (best) |"),
              "|---|---|---|---|---|---|---|"]
    for spec, r in report.backends.items():
        if r.get("status") != "ok":
            continue
        for sw in r["decode_sweep"]:
            lines.append(f"| {spec} | {sw['batch']} | {sw['context']} | {sw['ms']['p50']:.1f} ({sw['ms']['p90']:.1f}, "
                         f"{sw['ms']['min']:.1f}) "
                         f"| {sw['bytes_per_step'] / 1e6:.0f} | {sw['roofline_ms']:.1f} | "
                         f"{sw['roofline_fraction']:.2f} ({sw['roofline_fraction_best']:.2f}) |")
    lines += ["", "### Targets (issue #6), measured in this run", "", "| target | measured | met |", "|---|---|---|"]
    for t in report.targets:
        v = "-" if t.value is None else f"{t.value:.2f}x"
        met = {True: "yes", False: "NO", None: "n/a"}[t.met]
        lines.append(f"| {t.target} | {v} | {met}{' (' + t.note + ')' if t.note else ''} |")
    if skipped:
        lines += ["", "Skipped:", *skipped]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """Decode time vs context (with rooflines) and the end-to-end stage breakdown, in one PNG."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in report.backends.items() if v.get("status") == "ok"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (spec, r) in enumerate(ok.items()):
        color = f"C{i}"
        for batch in sorted({s["batch"] for s in r["decode_sweep"]}):
            pts = [s for s in r["decode_sweep"] if s["batch"] == batch]
            style = "-o" if batch == min(s["batch"] for s in r["decode_sweep"]) else ":s"
            a1.plot([p["context"] for p in pts], [p["ms"]["p50"] for p in pts], style, color=color,
                    label=f"{spec} b{batch}")
            a1.plot([p["context"] for p in pts], [p["roofline_ms"] for p in pts], "--", color=color, alpha=0.5,
                    label=f"{spec} b{batch} roofline")
    a1.set_xlabel("context (cached positions)")
    a1.set_ylabel("ms per decode step (p50)")
    a1.set_title("Per-token decode vs context")
    a1.legend(fontsize=6, ncol=2)
    parts = ("preprocess", "vision", "qformer", "prefill", "decode")
    names = list(ok)
    bottoms = np.zeros(len(names))
    for j, part in enumerate(parts):
        vals = []
        for spec in names:
            e = ok[spec]["e2e"][min(ok[spec]["e2e"], key=int)]["stages_ms"]
            vals.append(e["decode_per_token"]["p50"] * (e["decode_per_token"]["n"] and
                                                        report.settings["new_tokens"] - 1)
                        if part == "decode" else e[part]["p50"])
        a2.bar(names, vals, bottom=bottoms, label=part, color=f"C{j}")
        bottoms += np.asarray(vals)
    a2.set_ylabel("ms (p50), smallest batch")
    a2.set_title("End to end by stage")
    a2.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: BenchReport, out: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``out``; each appears only when complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    atomic_write_text(paths["json"], json.dumps(report.to_json(), indent=2, default=float))
    atomic_write_text(paths["md"], render_markdown(report))
    plot(report, paths["png"])
    for p in paths.values():
        p.chmod(0o644)
    return paths


