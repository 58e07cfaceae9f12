#!/usr/bin/env bash
# Install blip2-export with everything needed to export, run and test, on a CPU machine.
# torch is pinned first to the CPU build (a plain 'torch' requirement can pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[export,dev,serve]"
# Type stubs for the TensorRT path (tensorrt itself is not on PyPI; the stubs' dependency on it is skipped).
"$PY" -m pip install -q --disable-pip-version-check --no-deps "tensorrt-stubs==10.13.0.35.1"
echo "blip2-export installed: $("$PY" -c 'import blip2_export; print(blip2_export.__version__)')"
