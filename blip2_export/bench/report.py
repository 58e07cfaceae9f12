"""The bench report (a dataclass; ``report.json`` is its ``to_json``) and the targets it is held to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.backends.int8_kernels import X86_ARCHS

TARGETS = {"ort-fp32": 0.5, "ort-int8": 0.3}  # end-to-end time vs eager (issue #6)
PEER_TARGETS = {"ort-int8": ("eager-dynint8", 0.6)}  # end-to-end time vs a peer, when both ran (issue #20)
DECODE_PEER_TARGETS = {"ort-int4": ("ort-int8", 0.6)}  # per-token decode p50 vs a peer, batch 1 (issue #16)
WEIGHT_PEER_TARGETS = {"ort-int4": ("ort-int8", 0.55)}  # LLM weight bytes a decode step reads vs a peer (#16)
ROOFLINE_TARGET = 1.5  # per-token decode within this factor of the roofline
CONTEXT_TARGET = 1.2  # decode at the largest context within this factor of the smallest


@dataclass
class Target:
    """One goal and what this run measured for it (``met`` None: it could not be measured here)."""

    target: str
    value: float | None
    met: bool | None
    note: str = ""


@dataclass
class BenchReport:
    """Everything one run measured. ``backends`` maps a backend spec (``ort-int8``) to its result: status
    (and the reason when skipped), what it loaded, stage percentiles per batch (``e2e``), the decode sweep
    with rooflines, peak memory, and ratios against eager."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    model: dict[str, Any]
    load_average_start: list[float]
    load_average_end: list[float] = field(default_factory=list)
    bandwidth_samples_gb_s: list[float] = field(default_factory=list)
    bandwidth_gb_s: float = 0.0
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BenchReport:
        """A report read back from ``report.json`` (to render it again)."""
        return cls(**{**doc, "targets": [Target(**t) for t in doc.get("targets", [])]})


def evaluate_targets(backends: dict[str, dict], *, arch: str = "", device: str = "cpu") -> list[Target]:
    """Issue #6's targets, measured in this run (batch 1 where it was run, else the smallest batch).

    End to end and decode vs context: ratios of p50s measured in interleaved rounds (load from other
    processes lands on both sides). Decode vs roofline: the best decode step against the best bandwidth
    sample, both the machine's uncontended capability (the p50 figure is reported beside it).
    """
    out = []
    x86_cpu = device == "cpu" and arch.lower() in X86_ARCHS
    for spec, limit in TARGETS.items():
        r = backends.get(spec, {})
        if r.get("status") != "ok":
            out.append(Target(f"{spec} end to end <= {limit}x eager", value=None, met=None,
                        note=r.get("reason", "not run")))
            continue
        batch = min(r["e2e"], key=int)
        v = r["e2e"][batch].get("e2e_vs_eager")
        out.append(Target(f"{spec} end to end <= {limit}x eager (batch {batch})", value=v,
                    met=None if v is None else v <= limit))
    for spec, (peer, limit) in PEER_TARGETS.items():  # ahead of what a CPU user tries first
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            batch = min(set(r["e2e"]) & set(p["e2e"]), key=int)
            v = r["e2e"][batch]["stages_ms"]["e2e"]["p50"] / p["e2e"][batch]["stages_ms"]["e2e"]["p50"]
            out.append(Target(f"{spec} end to end <= {limit}x {peer} (batch {batch})", value=v,
                        met=v <= limit))
    for spec, (peer, limit) in DECODE_PEER_TARGETS.items():
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            batch = min(set(r["e2e"]) & set(p["e2e"]), key=int)
            ms = [b["e2e"][batch]["stages_ms"]["decode_per_token"]["p50"] for b in (r, p)]
            out.append(Target(f"{spec} decode step <= {limit}x {peer} (batch {batch}, p50)", value=ms[0] / ms[1],
                              met=ms[0] / ms[1] <= limit, note=f"{ms[0]:.1f} ms vs {ms[1]:.1f} ms"))
    for spec, (peer, limit) in WEIGHT_PEER_TARGETS.items():
        r, p = backends.get(spec, {}), backends.get(peer, {})
        if r.get("status") == "ok" and p.get("status") == "ok":
            v = r["weight_bytes"] / p["weight_bytes"]
            out.append(Target(f"{spec} LLM weight bytes <= {limit}x {peer}", value=v, met=v <= limit,
                              note=f"{r['weight_bytes'] / 1e6:.1f} MB vs {p['weight_bytes'] / 1e6:.1f} MB"))
    for spec, r in backends.items():
        if r.get("status") != "ok" or not spec.startswith(("ort", "trt")):
            continue
        first = min(r["decode_sweep"], key=lambda s: (s["batch"], s["context"]))
        x = first["ms"]["min"] / first["roofline_ms"]
        note = f"p50: {first['ms']['p50'] / first['roofline_ms']:.2f}x"
        if x86_cpu and spec == "ort-fp16":
            note += ("; x86 CPU: ONNX Runtime has no fp16 matmul kernels here and runs fp16 on fp32 copies of the "
                     "weights, reading twice the bytes this roofline counts")
        out.append(Target(f"{spec} decode within {ROOFLINE_TARGET}x roofline (batch {first['batch']}, "
                              f"context {first['context']}, best step)", value=x, met=x <= ROOFLINE_TARGET,
                    note=note))
        if "context_growth" in r:
            g = r["context_growth"]
            out.append(Target(f"{spec} decode at context {g['to']} <= {CONTEXT_TARGET}x context {g['from']} "
                                  "(p50)", value=g["ratio"], met=g["ratio"] <= CONTEXT_TARGET,
                        note=f"best steps: {g['ratio_best']:.2f}x"))
    return out
