"""``blip2-export build``: bad input gives one clear line and a non-zero exit, nothing half-written;
TensorRT engine compatibility and profiles (pure functions, no GPU needed)."""

from __future__ import annotations

import pytest

from blip2_export.cli import EXIT_USER_ERROR, main
from runtime.backends.trt import tensorrt_status
from runtime.contract import decoder_io
from runtime.errors import BundleError
from runtime.manifest import DimRange, EngineRecord, GraphRecord


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "calibration folder not found"),
    (lambda d: d.mkdir(), "has no images"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "has no images"),
])
def test_bad_calibration_folder(bundle_copy, tmp_path, capsys, setup, match):
    calib = tmp_path / "calib"
    setup(calib)
    before = _snapshot(bundle_copy)
    code, err = _run(["build", str(bundle_copy), "--precision", "int8", "--backend", "ort",
                      "--calib-images", str(calib)], capsys)
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1
    assert _snapshot(bundle_copy) == before


def test_int8_without_calibration_images_names_the_flag(bundle_copy, capsys):
    code, err = _run(["build", str(bundle_copy), "--precision", "int8", "--backend", "ort"], capsys)
    assert code == EXIT_USER_ERROR and "--calib-images" in err


# tensorrt-stubs make `import tensorrt` succeed without the library: ask the backend what is there
NO_TRT = pytest.mark.skipif("tensorrt is not installed" not in (tensorrt_status() or ""),
                            reason="TensorRT is installed here: this checks the machines without it")


@NO_TRT
def test_trt_without_tensorrt_names_the_extra(bundle_copy, capsys):
    before = _snapshot(bundle_copy)
    code, err = _run(["build", str(bundle_copy), "--precision", "fp16", "--backend", "trt"], capsys)
    assert code == EXIT_USER_ERROR and len(err.splitlines()) == 1
    assert "tensorrt is not installed" in err and "blip2-export[trt]" in err
    assert _snapshot(bundle_copy) == before


def test_precision_the_backend_cannot_run(bundle_copy, capsys):
    code, err = _run(["build", str(bundle_copy), "--precision", "fp32", "--backend", "ort"], capsys)
    assert code == EXIT_USER_ERROR and "fp32 has nothing to build" in err
    code, err = _run(["run", str(bundle_copy), "--precision", "fp16", "--image", "x.png"], capsys)
    assert code == EXIT_USER_ERROR and "no fp16 graphs" in err and "blip2-export build" in err


@NO_TRT
def test_trt_run_without_tensorrt_names_the_extra(bundle_copy, capsys):
    code, err = _run(["run", str(bundle_copy), "--backend", "trt", "--image", "x.png"], capsys)
    assert code == EXIT_USER_ERROR and "blip2-export[trt]" in err


@NO_TRT
def test_auto_backend_builds_for_ort_here_and_refuses_to_rebuild_silently(bundle_copy, capsys):
    assert main(["build", str(bundle_copy), "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "built fp16 for ort" in out and "decoder.fp16.onnx" in out
    code, err = _run(["build", str(bundle_copy), "--precision", "fp16"], capsys)
    assert code == EXIT_USER_ERROR and "--force" in err
    from runtime.manifest import load_manifest

    first = (bundle_copy / "decoder.fp16.onnx").read_bytes()
    assert main(["build", str(bundle_copy), "--precision", "fp16", "--force"]) == 0
    rebuilt = load_manifest(bundle_copy).graphs["fp16"]["decoder"].file
    assert rebuilt == "decoder.fp16.b.onnx"  # new files never overwrite the ones the old manifest vouches for
    assert (bundle_copy / rebuilt).read_bytes() == first  # deterministic transform
    assert not (bundle_copy / "decoder.fp16.onnx").exists()  # the previous build's files are removed
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_build_help_teaches():
    from click.testing import CliRunner

    from blip2_export.cli import cli

    out = CliRunner().invoke(cli, ["build", "--help"]).output
    for text in ("--calib-images", "--timing-cache", "--ort-kv-cache", "strongly typed",
                 "blip2-export build ./bundle --precision int8"):
        assert text in out


# -- TensorRT engines: compatibility and profiles, as pure functions ---------------------------------
def _record(engines=()):
    io = decoder_io(hidden=32, layers=1, heads=2, head_dim=16, vocab=50, dtype="float16")
    return GraphRecord(name="decoder", file="decoder.fp16.onnx", sha256="0" * 64, io=io, precision="fp16",
                       engines=tuple(engines))


def _engine(name="NVIDIA A100-SXM4-80GB", cc="8.0", version="10.13.0"):
    return EngineRecord(file="decoder.fp16.plan", sha256="0" * 64, backend="trt", device_name=name,
                        compute_capability=cc, backend_version=version)


@pytest.mark.parametrize("device,reason", [
    (("NVIDIA H100 80GB HBM3", "9.0", "10.13.0"), "compute capability 8.0"),
    (("NVIDIA A100-SXM4-80GB", "8.0", "11.0.0"), "TensorRT 10.13.0 (installed: 11.0.0)"),
    (("NVIDIA A100-PCIE-40GB", "8.0", "10.13.0"), "GPU 'NVIDIA A100-SXM4-80GB'"),
])
def test_engine_from_another_device_says_rebuild(device, reason):
    from runtime.backends.trt import DeviceInfo, check_engine, select_engine

    dev = DeviceInfo(*device)
    with pytest.raises(BundleError, match="rebuild") as e:
        check_engine(_engine(), dev)
    assert reason in str(e.value)
    with pytest.raises(BundleError, match="--precision fp16 --backend trt"):
        select_engine(_record([_engine()]), dev)


def test_engine_for_this_device_is_selected():
    from runtime.backends.trt import DeviceInfo, select_engine

    here = _engine("NVIDIA L4", "8.9", "10.13.0")
    rec = _record([_engine(), here])
    assert select_engine(rec, DeviceInfo("NVIDIA L4", "8.9", "10.13.0")) is here
    with pytest.raises(BundleError, match="no TensorRT engine"):
        select_engine(_record(), DeviceInfo("NVIDIA L4", "8.9", "10.13.0"))


def test_profile_shapes_follow_the_manifest_dims(tiny_bundle):
    from engines.build import BuildConfig
    from engines.trt_builder import profile_shapes
    from runtime.manifest import load_manifest

    m = load_manifest(tiny_bundle)
    dims = BuildConfig(precision="fp16", backend="ort", max_batch=4, max_context=64).engine_dims(m)
    assert dims["batch"] == DimRange(1, 1, 4) and dims["total"].max == 64 and dims["past"].max == 63
    shapes = profile_shapes(m.expected_io("decoder", "float16"), dims)
    lo, _opt, hi = shapes["past.0.key"]
    assert lo == (1, m.model.llm_heads, 0, m.model.head_dim)
    assert hi == (4, m.model.llm_heads, 63, m.model.head_dim)
    assert shapes["inputs_embeds"][2] == (4, 64, m.model.llm_hidden)
    with pytest.raises(Exception, match="--max-batch"):
        BuildConfig(precision="fp16", backend="ort", max_batch=10_000).validate(m)
