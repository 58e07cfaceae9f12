"""Spine acceptance 3: the runtime works where importing torch (or transformers) fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_blocker_really_blocks(no_torch_env):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_import_runtime_without_torch(no_torch_env):
    code = "import runtime, runtime.pipeline, runtime.generation, runtime.backends.ort, engines; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=no_torch_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_import_server_without_torch(no_torch_env):
    """`blip2-export serve` imports its server and scheduler on an edge box (tests/test_serve.py runs the whole
    server there)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    code = ("import runtime.serving.server, runtime.serving.scheduler, runtime.serving.slots, sys; "
            "print('ok', any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=no_torch_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok False"


def test_full_run_without_torch(tmp_path, tiny_bundle, no_torch_env):
    img = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(img)
    cmd = [sys.executable, "-m", "blip2_export.cli", "run", str(tiny_bundle), "--image", str(img),
           "--prompt", "a photo of", "--max-new-tokens", "5", "--json"]
    r = subprocess.run(cmd, env=no_torch_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"token_ids"' in r.stdout
    # and the same answer as with torch importable
    from runtime.pipeline import Blip2Runtime

    expect = Blip2Runtime(tiny_bundle).generate([img], ["a photo of"], max_new_tokens=5)[0]
    assert str(expect.token_ids) in r.stdout.replace(" ", "").replace(",", ", ")


def test_runtime_and_engines_sources_never_import_torch():
    root = Path(__file__).resolve().parents[1]
    bad = []
    for pkg in ("runtime", "engines"):
        for f in (root / pkg).rglob("*.py"):
            for line in f.read_text().splitlines():
                s = line.strip()
                if s.startswith(("import torch", "from torch", "import transformers", "from transformers")):
                    bad.append(f"{f.relative_to(root)}: {s}")
    assert not bad, bad
