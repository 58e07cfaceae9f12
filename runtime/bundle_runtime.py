"""What every runtime of a bundle sets up the same way: the manifest, the precision's graphs (loaded on
first use), the backend, the tokenizer and a per-call deadline. :class:`runtime.pipeline.Blip2Runtime`
(captioning, VQA) and :class:`runtime.retrieval.RetrievalRuntime` (ITC/ITM ranking) build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runtime.backends import GraphRunner, GraphSet, create_backend
from runtime.bundle_files import BundleFiles
from runtime.contract import Family, GraphName
from runtime.deadline import DEFAULT_TIMEOUT_S
from runtime.manifest import Manifest, check_sizes, load_manifest
from runtime.text import load_text


class BundleRuntime:
    """A bundle opened for one precision on one backend. Subclasses say which families they serve
    (:meth:`check_family`) and what they run."""

    def __init__(self, bundle: str | Path, *, precision: str = "fp32", backend: str = "ort", verify: bool = True,
                 timeout: float | None = DEFAULT_TIMEOUT_S, **backend_options):
        """``timeout``: wall-clock seconds each call may take (None: no limit)."""
        self.bundle = Path(bundle)
        self.verify = verify
        self.timeout = timeout
        # Every name resolves inside the bundle; nothing is hashed here. Each file this precision uses is
        # read once, when it is loaded, and checked on those very bytes; other precisions' files are not read.
        self.manifest: Manifest = load_manifest(self.bundle, verify=False)
        self.check_family(self.manifest.family)
        self.precision = precision
        for g in self.manifest.required_graphs():
            rec = self.manifest.graph(g, precision)  # fails early if one is missing
            if verify:
                check_sizes(self.bundle, rec)  # a truncated file fails now, not at first use
        self.backend = create_backend(backend, **backend_options)
        self.tokenizer, self.embed = load_text(self.bundle, self.manifest, verify, precision)
        self._graph_set = GraphSet(self.bundle, self.manifest, precision, self.backend, verify)

    def check_family(self, family: Family) -> None:
        """Raise when this runtime cannot serve a bundle of ``family``."""

    @property
    def family(self) -> Family:
        return self.manifest.family

    def graph(self, name: GraphName):
        """The runner for ``name`` (loaded once, on first use)."""
        return self._graph_set.get(name)

    def describe_loaded(self) -> list[str]:
        """One line per loaded graph: the file that runs and, for calibrated int8 graphs, the int8 form."""
        lines = []
        for name, runner in self._graph_set.loaded.items():
            f = runner.facts
            lines.append(f"{name}: {f.file} ({self.backend.name}, {self.precision})"
                         + (f"; int8 kernel {f.int8.describe()}" if f.int8 is not None else ""))
        return lines

    def release_graph(self, name: GraphName) -> None:
        """Unload ``name`` (e.g. the vision graph once every image is encoded); it loads again on next use."""
        self._graph_set.release(name)

    def use_graph(self, name: GraphName, folder: str | Path, record) -> GraphRunner:
        """Run ``record`` (a ``GraphRecord`` whose files lie in ``folder``, checked as they load) as ``name``
        instead of the manifest's graph: a build calibrates through a graph it has made but not yet
        added to the bundle. Returns the runner."""
        folder = Path(folder)
        runner = self.backend.load(folder, record, BundleFiles(folder, verify=self.verify))
        self._graph_set.put(name, runner)
        return runner

    def wrap_graph(self, name: GraphName, wrap: Callable[[GraphRunner], GraphRunner]) -> GraphRunner:
        """Replace the runner of ``name`` by ``wrap(runner)`` (recorders, instrumentation); returns it."""
        return self._graph_set.wrap(name, wrap)
