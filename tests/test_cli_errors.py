"""Spine acceptance 4: bad input -> one clear line, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2_export.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _png(path: Path, size=(24, 20)) -> Path:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_missing_image(tiny_bundle, tmp_path, capsys):
    code, _, err = run_cli(["run", tiny_bundle, "--image", tmp_path / "nope.jpg"], capsys)
    assert_one_line_error(code, err, "image not found", "nope.jpg")


def test_corrupt_image(tiny_bundle, tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    code, _, err = run_cli(["run", tiny_bundle, "--image", bad], capsys)
    assert_one_line_error(code, err, "bad.png")


def test_non_image_file(tiny_bundle, tmp_path, capsys):
    f = tmp_path / "notes.jpg"
    f.write_text("this is not a JPEG")
    code, _, err = run_cli(["run", tiny_bundle, "--image", f], capsys)
    assert_one_line_error(code, err, "not an image")


def test_bundle_with_missing_file(bundle_copy, tmp_path, capsys):
    (bundle_copy / "decoder.onnx").unlink()
    code, _, err = run_cli(["run", bundle_copy, "--image", _png(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "missing", "decoder.onnx")


def test_bundle_with_modified_file(bundle_copy, tmp_path, capsys):
    f = bundle_copy / "embed_tokens.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    code, _, err = run_cli(["run", bundle_copy, "--image", _png(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "embed_tokens.npy", "checksum")


def test_manifest_from_newer_format(bundle_copy, tmp_path, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", bundle_copy, "--image", _png(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "format version 99", "upgrade")


def test_not_a_bundle(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path, "--image", _png(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "manifest.json")


def test_prompt_longer_than_context(tiny_bundle, tmp_path, capsys):
    prompt = " ".join(["red"] * 200)  # the tiny bundle was exported with --max-context 128
    code, _, err = run_cli(["run", tiny_bundle, "--image", _png(tmp_path / "x.png"), "--prompt", prompt], capsys)
    assert_one_line_error(code, err, "exceeds the bundle's context", "--max-context")


def test_batch_above_bundle_limit(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b2"
    assert run_cli(["export", tiny_checkpoint, "-o", out, "--max-batch", "2"], capsys)[0] == 0
    imgs = [_png(tmp_path / f"{i}.png") for i in range(3)]
    args = ["run", out] + [a for p in imgs for a in ("--image", p)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "batch=3", "--max-batch")


def test_export_refuses_existing_output_unless_force(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_cli(["export", tiny_checkpoint, "-o", out], capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "user data"
    code, stdout, err = run_cli(["export", tiny_checkpoint, "-o", out, "--force"], capsys)
    assert code == 0, err
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()


def test_export_of_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    code, _, err = run_cli(["export", tmp_path / "ck", "-o", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "config.json")
    assert not (tmp_path / "b").exists()


def test_interrupted_export_leaves_no_bundle(tiny_checkpoint, tmp_path, monkeypatch):
    """An exception in the middle of the export (after some graphs are written) leaves nothing at OUT."""
    from blip2_export import bundle_writer
    from blip2_export import export as export_mod

    calls = {"n": 0}
    real = bundle_writer.export_onnx

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bundle_writer, "export_onnx", failing)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_bundle(tiny_checkpoint, out, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # temp folder cleaned up


def test_killed_export_leaves_no_complete_looking_bundle(tiny_checkpoint, tmp_path):
    """SIGKILL mid-export: whatever is left is a hidden temp folder, never OUT with a manifest."""
    out = tmp_path / "bundle"
    code = (
        "import os, signal\n"
        "from blip2_export import bundle_writer as e, export as x\n"
        "real = e.export_onnx\n"
        "n = [0]\n"
        "def f(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "e.export_onnx = f\n"
        f"x.export_bundle({str(tiny_checkpoint)!r}, {str(out)!r}, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == -9
    assert not out.exists()
    from runtime.manifest import load_manifest

    for leftover in tmp_path.iterdir():
        assert leftover.name.startswith("."), leftover  # only hidden temp folders
        with pytest.raises(Exception):
            load_manifest(leftover)


def test_help_teaches(capsys):
    for args in (["--help"], ["export", "--help"], ["run", "--help"], ["parity", "--help"], ["demo", "--help"]):
        code, out, _ = run_cli(args, capsys)
        assert code == 0
        assert "Usage:" in out
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert "--prompt" in out and "--beams" in out and "--precision" in out
