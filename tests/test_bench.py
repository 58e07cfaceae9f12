"""``blip2-export bench`` on the tiny bundle: what it writes (timings themselves are not asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blip2_export.bench import (
    STAGES,
    BenchConfig,
    BenchReport,
    evaluate_targets,
    kv_bytes,
    memory_bandwidth,
    onnx_weight_bytes,
    parse_backend,
    percentiles,
    render_markdown,
    run_bench,
)
from blip2_export.cli import main
from runtime.backends.trt import tensorrt_status
from runtime.errors import Blip2Error
from runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def report_dir(tiny_checkpoint, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    code = main(["bench", str(tiny_checkpoint), str(tiny_bundle), "--backends", "eager,eager-dynint8,ort-fp32,ort-int8,trt-fp16",
                 "--batch", "1,2", "--contexts", "16,40", "--new-tokens", "4", "--repeats", "1", "--warmup", "0",
                 "--decode-steps", "2", "--threads", "1", "-o", str(out)])
    assert code == 0
    return out


def test_bench_writes_json_markdown_and_plot(report_dir):
    r = json.loads((report_dir / "report.json").read_text())
    assert {"machine", "settings", "model", "bandwidth_gb_s", "backends", "targets"} <= set(r)
    assert r["bandwidth_gb_s"] > 0 and r["settings"]["threads"] == 1
    from runtime.backends.int8_kernels import choose, cpu_features

    assert r["machine"]["cpu_class"] == cpu_features()["class"]  # rows are named by the CPU they ran on
    assert r["machine"]["int8_kernel"] == choose().describe()
    for spec in ("eager", "ort-fp32"):
        b = r["backends"][spec]
        assert b["status"] == "ok" and b["weight_bytes"] > 0
        assert set(b["e2e"]) == {"1", "2"}
        for e in b["e2e"].values():
            assert set(e["stages_ms"]) == set(STAGES)
            d = e["stages_ms"]["decode_per_token"]
            assert d["n"] == 3 and d["p50"] <= d["p90"] <= d["p99"]  # new_tokens - 1 steps, one run
            assert e["tokens_per_s"] > 0
        assert [(s["batch"], s["context"]) for s in b["decode_sweep"]] == [(1, 16), (1, 40), (2, 16), (2, 40)]
        assert all(0 < s["roofline_ms"] and s["roofline_fraction"] > 0 for s in b["decode_sweep"])
        assert b["peak_rss_mb"] > 0
    assert r["backends"]["ort-fp32"]["kv_cache"] == "shared_buffer"
    for batch in ("1", "2"):  # the ratio is the two p50s of this run, per batch
        ort, eager = (r["backends"][k]["e2e"][batch]["stages_ms"]["e2e"]["p50"] for k in ("ort-fp32", "eager"))
        assert r["backends"]["ort-fp32"]["e2e"][batch]["e2e_vs_eager"] == pytest.approx(ort / eager)
    assert r["backends"]["ort-int8"] == {"status": "skipped", "reason": r["backends"]["ort-int8"]["reason"]}
    assert "no int8 graphs" in r["backends"]["ort-int8"]["reason"]
    trt = r["backends"]["trt-fp16"]
    if "tensorrt is not installed" in (tensorrt_status() or ""):  # (tensorrt-stubs alone: not installed)
        assert trt["reason"] == "not available here: tensorrt not installed"
    else:  # a TensorRT machine: it ran, or says what else is missing (a GPU, the engines)
        assert trt["status"] == "ok" or "tensorrt not installed" not in trt["reason"], trt
    names = [t["target"] for t in r["targets"]]
    assert any(n.startswith("ort-fp32 end to end") for n in names)
    assert any("roofline" in n for n in names) and any("context 40" in n for n in names)
    md = (report_dir / "report.md").read_text()
    assert render_markdown(BenchReport.from_json(r)) == md  # the JSON holds the whole typed report
    assert "| ort-fp32 | 1 |" in md and "| eager | 2 |" in md and "roofline" in md
    if trt["status"] != "ok":
        assert f"`trt-fp16`: skipped, {trt['reason']}" in md
    assert (report_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_dynamic_int8_is_timed_beside_eager(report_dir):
    """The peer a CPU user tries first (torch's quantize_dynamic on every Linear) runs in the same rounds."""
    r = json.loads((report_dir / "report.json").read_text())
    peer, eager = r["backends"]["eager-dynint8"], r["backends"]["eager"]
    assert peer["status"] == "ok" and peer["eager_variant"] == "dynint8" and eager["eager_variant"] == "fp32"
    assert 0 < peer["weight_bytes"] < 0.5 * eager["weight_bytes"]  # its Linear weights are int8 now
    for batch in ("1", "2"):
        ratio = peer["e2e"][batch]["stages_ms"]["e2e"]["p50"] / eager["e2e"][batch]["stages_ms"]["e2e"]["p50"]
        assert peer["e2e"][batch]["e2e_vs_eager"] == pytest.approx(ratio)
    assert "| eager-dynint8 | 1 |" in (report_dir / "report.md").read_text()


def test_ort_int8_is_held_against_torch_dynamic_int8():
    def e2e(ms):
        return {"1": {"stages_ms": {"e2e": {"p50": ms}}}}

    def row(int8_ms, peer_status="ok"):
        sweep = [{"batch": 1, "context": 64, "ms": {"p50": 2.0, "min": 2.0}, "roofline_ms": 1.0}]
        report = {"backends": {"ort-int8": {"status": "ok", "e2e": e2e(int8_ms), "decode_sweep": sweep},
                               "eager-dynint8": {"status": peer_status, "e2e": e2e(100.0)}}}
        return next((t for t in evaluate_targets(report["backends"]) if "eager-dynint8" in t.target), None)

    assert row(50.0).value == pytest.approx(0.5) and row(50.0).met is True
    assert row(70.0).met is False
    assert row(50.0, peer_status="skipped") is None  # no peer in the run, no row


def test_fp16_on_an_x86_cpu_is_explained_in_the_targets():
    """The fp16 roofline row says why it cannot be met on an x86 CPU (and only there)."""
    sweep = [{"batch": 1, "context": c, "ms": {"p50": 12.0, "min": 11.0}, "roofline_ms": 5.0} for c in (64, 512)]
    backend = {"status": "ok", "e2e": {}, "decode_sweep": sweep}

    def fp16_note(arch, device="cpu"):
        rows = evaluate_targets({"ort-fp16": backend}, arch=arch, device=device)
        row = next(t for t in rows if t.target.startswith("ort-fp16 decode within"))
        assert row.value == pytest.approx(2.2) and row.met is False
        return row.note

    assert "no fp16 matmul kernels" in fp16_note("x86_64")
    assert "no fp16 matmul kernels" not in fp16_note("aarch64")
    assert "no fp16 matmul kernels" not in fp16_note("x86_64", device="cuda")


def test_config_and_inputs_are_checked_before_running(tiny_bundle):
    with pytest.raises(Blip2Error, match="unknown backend 'ort-fp8'"):
        BenchConfig(backends=("ort-fp8",)).validate()
    with pytest.raises(Blip2Error, match="--new-tokens"):
        BenchConfig(new_tokens=1).validate()
    with pytest.raises(Blip2Error, match="--contexts"):  # tiny bundle: 128 positions
        run_bench(None, tiny_bundle, BenchConfig(backends=("ort-fp32",), contexts=(64, 500), progress=False))
    assert parse_backend("eager") == ("eager", "fp32") and parse_backend("trt-fp16") == ("trt", "fp16")


def test_cli_rejects_a_bad_list(tiny_bundle, tmp_path, capsys):
    code = main(["bench", str(tmp_path), str(tiny_bundle), "--batch", "1,x", "-o", str(tmp_path / "r")])
    assert code != 0 and not (tmp_path / "r").exists()


def test_roofline_inputs(tiny_bundle):
    import onnx
    from onnx import numpy_helper

    m = load_manifest(tiny_bundle)
    path = tiny_bundle / "decoder.onnx"
    model = onnx.load(str(path))
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    gathered = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in sizes]
    assert gathered  # OPT's position table: a step reads one row of it, not the whole table
    assert onnx_weight_bytes(path) == sum(sizes.values()) - sum(sizes[g] for g in set(gathered))
    assert onnx_weight_bytes(path) >= m.model.llm_hidden * m.model.vocab_size * 4  # at least the LM head
    assert kv_bytes(m.model, 10, 2, 4) == 2 * m.model.llm_layers * 2 * m.model.llm_heads * 10 * m.model.head_dim * 4
    p = percentiles([0.001, 0.002, 0.003, 0.004])
    assert p["p50"] == pytest.approx(2.5) and p["n"] == 4 and p["p99"] <= 4.0
    assert np.isnan(percentiles([])["p50"])
    assert memory_bandwidth(1, mbytes=8, tries=1) > 1e8


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_device_is_checked_before_any_long_work(tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    with pytest.raises(Blip2Error, match="--device 'tpu'"):
        BenchConfig(device="tpu").validate()
    if _cuda():
        pytest.skip("this machine has a CUDA device: the no-GPU message does not apply")
    with pytest.raises(Blip2Error, match="torch sees no CUDA device"):
        run_bench(tiny_checkpoint, tiny_bundle, BenchConfig(backends=("eager",), device="cuda", progress=False))
    out = tmp_path / "r"
    code = main(["bench", str(tiny_checkpoint), str(tiny_bundle), "--device", "cuda", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "--device cpu" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
def test_bench_on_the_gpu(tiny_checkpoint, tiny_bundle, tmp_path):
    """The GPU baseline: eager in fp16 on CUDA, the bundle on ONNX Runtime's CUDA provider, GPU memory."""
    import onnxruntime as ort

    backends = ("eager", "ort-fp32") if "CUDAExecutionProvider" in ort.get_available_providers() else ("eager",)
    r = run_bench(tiny_checkpoint, tiny_bundle, BenchConfig(backends=backends, contexts=(16, 40), new_tokens=4,
                                                            repeats=1, warmup=1, decode_steps=2, device="cuda",
                                                            progress=False))
    assert r.machine["gpu"] and r.settings["device"] == "cuda"
    for spec in backends:
        b = r.backends[spec]
        assert b["status"] == "ok" and b["device"] == "cuda" and b["gpu_peak_mb"] > 0, b
    assert r.backends["eager"]["precision"] == "fp16" and r.backends["eager"]["kv_itemsize"] == 2
    assert r.bandwidth_gb_s > 50  # any CUDA GPU streams device memory faster than this
