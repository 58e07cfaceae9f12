"""Shared fixtures: tiny random BLIP-2 checkpoints and their bundles, built once per test session.

Add area-specific fixtures in your own test module (or a ``tests/fixtures_*.py`` plugin) rather than here.
"""

from __future__ import annotations

import os
import warnings

import pytest
from bundle_tools import SESSION_DIRS, session_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*torchvision.*")


def pytest_configure(config):
    # The eager reference and ONNX Runtime share 2 cores in one process: torch's own thread pool
    # fighting ORT's spinning workers made eager generate 20-40x slower. One torch thread is enough
    # for the tiny and mid test models.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's eager runs (an earlier test may have changed the count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- disk: the suite's bundles are removed as soon as their module is done ---------------------------
# Full suite runs wrote 8.5 GB of bundles under pytest's temp folder, all kept to the end; a CI machine
# with less free disk fails on that alone. Function-scoped ``tmp_path`` folders go when their test passes
# (``tmp_path_retention_policy = "failed"`` in pyproject.toml); what a module's fixtures made with
# ``tmp_path_factory`` goes when the module is done (below), unless one of its tests failed. Folders of
# session-scoped fixtures (and of builds cached for the whole process) are made with
# ``bundle_tools.session_dir`` and kept.
_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__ if item.module is not None else "")
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_temp_cleanup(request, tmp_path_factory):
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return  # kept for a look at what went wrong
    for name in set(os.listdir(base)) - before - SESSION_DIRS:
        shutil.rmtree(base / name, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from blip2_export.modelzoo import make_random_checkpoint

    return make_random_checkpoint(session_dir(tmp_path_factory, "ckpt") / "tiny-opt", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    from blip2_export.export import ExportConfig, export_bundle

    return export_bundle(tiny_checkpoint, session_dir(tmp_path_factory, "bundle") / "tiny-opt",
                         ExportConfig(max_context=128), progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from blip2_export.modelzoo import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


NO_TORCH_SITECUSTOMIZE = """\
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test: edge boxes do not have it")
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def no_torch_env(tmp_path):
    """Environment for a subprocess in which importing torch or transformers fails (an edge box)."""
    from pathlib import Path

    site = tmp_path / "no-torch-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TORCH_SITECUSTOMIZE)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])]))
