"""Type-check the TensorRT code paths against ``tensorrt-stubs`` with mypy (CI runs this; no GPU needed).

    python -m engines.typecheck            # exit status 0 when clean

``tensorrt-stubs`` 10.13 installs ``tensorrt/`` and ``tensorrt_bindings/`` *without* ``py.typed``, so
mypy ignores them (every ``trt.*`` would be ``Any``), and its ``.pyi`` has two syntax errors (a
parameter named ``in``; a non-default parameter after defaults). This copies the stubs to a temporary
folder, fixes those two lines, and runs mypy with that folder on ``MYPYPATH``, errors inside the stubs
themselves ignored. The files checked are the ones that touch TensorRT or CUDA.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("engines/build.py", "engines/trt_builder.py", "engines/fp16.py", "engines/int8.py",
         "engines/calibration.py", "engines/onnx_utils.py", "engines/ort/pipelines.py", "engines/int4.py", "runtime/precisions.py",
         "runtime/backends/trt.py", "engines/engine_builders.py")
CONFIG = """[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
warn_unused_ignores = True

[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt,tensorrt_bindings]
ignore_errors = True
"""


def prepare_stubs(dst: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for pkg in ("tensorrt", "tensorrt_bindings"):
        if not (site / pkg).is_dir():
            sys.exit(f"error: {pkg} stubs not found in {site} (pip install tensorrt-stubs --no-deps)")
        shutil.copytree(site / pkg, dst / pkg, ignore=shutil.ignore_patterns("*.so", "*.py", "__pycache__"))
    pyi = dst / "tensorrt_bindings" / "tensorrt.pyi"
    text = pyi.read_text(encoding="utf-8")
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", text)
    text = re.sub(r"(= None, \w+: \w+)\)", r"\1 = ...)", text)
    pyi.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from mypy import api

    files = list(argv) if argv else [str(ROOT / f) for f in FILES]
    with tempfile.TemporaryDirectory(prefix="trt-stubs-") as tmp:
        prepare_stubs(Path(tmp))
        cfg = Path(tmp) / "mypy.ini"
        cfg.write_text(CONFIG.replace("[mypy]\n", f"[mypy]\nmypy_path = {tmp}\n", 1))
        out, err, status = api.run(["--config-file", str(cfg), *files])
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
