"""Spine acceptance 3: the runtime works where importing torch (or transformers) fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

BLOCKER = textwrap.dedent('''
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test: edge boxes do not have it")
            return None
    sys.meta_path.insert(0, _Block())
''')


def _env(tmp_path: Path) -> dict:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])
    return env


def test_blocker_really_blocks(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=_env(tmp_path), capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_import_runtime_without_torch(tmp_path):
    code = "import runtime, runtime.pipeline, runtime.generation, runtime.backends.ort, engines; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_full_run_without_torch(tmp_path, tiny_bundle):
    img = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(img)
    cmd = [sys.executable, "-m", "blip2_export.cli", "run", str(tiny_bundle), "--image", str(img),
           "--prompt", "a photo of", "--max-new-tokens", "5", "--json"]
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True)
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
