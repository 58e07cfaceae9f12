"""Backends run one graph of a bundle: ``runner.run(feeds) -> outputs`` by the manifest's IO names.

``ort`` (ONNX Runtime: CPU, CUDA or TensorRT execution providers) and ``trt`` (native TensorRT
engines) sit behind the same interface, so the generation loop is the same for every backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.bundle_files import BundleFiles
from runtime.errors import Blip2Error
from runtime.manifest import KV_CONCAT, KV_SHARED, GraphRecord
from runtime.registry import Registry

__all__ = ["BACKEND_REGISTRY", "KV_CONCAT", "KV_SHARED", "Backend", "BackendSpec", "GraphRunner", "GraphSet",
           "KvBinding", "RunnerFacts",
           "RunnerWrapper", "backend_help", "backend_names", "backend_spec", "create_backend", "register_backend",
           "unregister_backend"]


@dataclass(frozen=True)
class RunnerFacts:
    """What a loaded graph is, beyond ``run(feeds)``: every runner has one, and callers read it instead of
    probing the runner's attributes.

    ``file``: the file that runs; ``engine``: the same when it is an engine build of the graph (None: the
    portable graph runs); ``kv_cache``: how a decoder's
    cache is fed (:data:`KV_CONCAT` through ``run``, :data:`KV_SHARED` through :meth:`GraphRunner.binding`);
    ``kv_dtype``: the cache's numpy type name when it differs from the graph's float IO (an int8 cache);
    ``int8``: the int8 weight form loaded, for calibrated int8 graphs (``runtime.backends.int8_kernels``).
    """

    file: str
    engine: str | None = None
    kv_cache: str = KV_CONCAT
    kv_dtype: str | None = None
    int8: Any = None  # runtime.backends.int8_kernels.Int8Choice

    def describe(self) -> str:
        return self.file + (f"; int8 kernel {self.int8.describe()}" if self.int8 is not None else "")


class KvBinding(Protocol):
    """Inputs bound by pointer, outputs bound to caller buffers (possibly the bound inputs), kept across runs."""

    def input(self, name: str, array: np.ndarray) -> None: ...

    def output(self, name: str, buffer: np.ndarray | None = None) -> None: ...

    def run(self) -> dict[str, np.ndarray]: ...


class GraphRunner(Protocol):
    """One loaded graph. ``run`` takes and returns numpy arrays by the manifest's IO names.

    ``binding()`` is required where ``facts.kv_cache`` is :data:`KV_SHARED` (the in-place cache path);
    other runners raise :class:`Blip2Error` from it.
    """

    record: GraphRecord
    facts: RunnerFacts

    @property
    def calls(self) -> int: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def binding(self) -> KvBinding: ...


class RunnerWrapper:
    """Base of runners that wrap another (recorders, instrumentation): record, facts, calls and binding
    are the wrapped runner's unless the subclass says otherwise. A wrapper that records ``run`` feeds of a
    decoder must say so by running the copying path (``facts`` with ``kv_cache=KV_CONCAT``, see
    :meth:`copying`): the in-place path never calls ``run``."""

    def __init__(self, runner: GraphRunner):
        self.runner = runner
        self.record = runner.record
        self.facts = runner.facts

    def copying(self) -> RunnerWrapper:
        """This wrapper, made to feed the cache through ``run`` (so every call passes through it)."""
        self.facts = replace(self.facts, kv_cache=KV_CONCAT)
        return self

    @property
    def calls(self) -> int:
        return self.runner.calls

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(feeds)

    def binding(self) -> KvBinding:
        return self.runner.binding()


class Backend(Protocol):
    name: str

    def load(self, bundle: Path, record: GraphRecord, files=None) -> GraphRunner: ...  # files: BundleFiles


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend: where its runner lives (imported only when chosen), which pip extra
    installs what it needs, and what it takes from the command line."""

    name: str
    summary: str  # one line for --help
    target: str  # "module:Class" of the Backend
    extra: str  # pip extra that installs its dependencies
    options: tuple[str, ...] = ()  # keyword options its constructor takes from the CLI (threads, int8_kernel)
    precisions: tuple[str, ...] = ()  # precisions whose graphs it runs (empty: every one the bundle has)
    notes: dict = field(default_factory=dict)


BACKEND_REGISTRY: Registry[str, BackendSpec] = Registry("backend", lambda s: s.name)


def register_backend(spec: BackendSpec) -> BackendSpec:
    return BACKEND_REGISTRY.register(spec)


def unregister_backend(name: str) -> None:
    BACKEND_REGISTRY.unregister(name)


def backend_names() -> tuple[str, ...]:
    return BACKEND_REGISTRY.names()


def backend_spec(name: str) -> BackendSpec:
    return BACKEND_REGISTRY.find(name)


def backend_help() -> str:
    return "; ".join(f"{s.name}: {s.summary}" for s in BACKEND_REGISTRY.values())


def create_backend(name: str = "ort", **options) -> Backend:
    """The registered backend ``name``, constructed with ``options`` (its module is imported only now)."""
    spec = backend_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise Blip2Error(f"backend {name} takes no option {', '.join(unknown)}",
                         hint=f"its options: {', '.join(spec.options) or 'none'}")
    module, _, cls = spec.target.partition(":")
    return getattr(importlib.import_module(module), cls)(**options)


register_backend(BackendSpec(
    "ort", "ONNX Runtime (CPU; CUDA or TensorRT execution providers with the gpu/trt extras)",
    "runtime.backends.ort:OrtBackend", extra="cpu", options=("providers", "threads", "optimize", "engines",
                                                             "int8_kernel", "staging_dir", "lower_weights")))
register_backend(BackendSpec(
    "trt", "TensorRT engines built by 'blip2-export build --backend trt' (NVIDIA GPU)",
    "runtime.backends.trt:TrtBackend", extra="trt", options=("device",)))
BACKENDS = backend_names()


class GraphSet:
    """The graphs of one bundle precision, each loaded once on first use (thread-safe).

    A graph's files are read once when it is loaded, and those very bytes are checked against the manifest
    (when ``verify``) and handed to the backend (``runtime.bundle_files``), so a file changed under a running
    service is refused rather than run, and nothing is read again by path after the check. ``loaded`` maps
    graph name to runner; calibration and tests wrap one with :meth:`wrap`.
    """

    def __init__(self, bundle: Path, manifest, precision: str, backend: Backend, verify: bool = True):
        import threading

        self.bundle, self.manifest, self.precision = Path(bundle), manifest, precision
        self.backend, self.verify = backend, verify
        self.loaded: dict[str, GraphRunner] = {}  # runners, by graph name (see :meth:`wrap`)
        self._lock = threading.Lock()

    def get(self, name) -> GraphRunner:

        key = name.value
        if key not in self.loaded:
            with self._lock:
                if key not in self.loaded:
                    rec = self.manifest.graph(name, self.precision)
                    self.loaded[key] = self.backend.load(self.bundle, rec, BundleFiles(self.bundle, verify=self.verify))
        return self.loaded[key]

    def release(self, name) -> None:
        """Drop the runner of ``name`` (its memory goes once no caller holds it); the next use loads it again."""
        with self._lock:
            self.loaded.pop(name.value, None)

    def put(self, name, runner: GraphRunner) -> None:
        """Run ``runner`` as ``name`` from now on (a graph loaded from elsewhere: see
        ``BundleRuntime.use_graph``)."""
        with self._lock:
            self.loaded[name.value] = runner

    def wrap(self, name, wrap) -> GraphRunner:
        """Load ``name`` if needed and replace its runner by ``wrap(runner)`` (e.g. a :class:`RunnerWrapper`)."""
        runner = self.get(name)
        with self._lock:
            self.loaded[name.value] = wrapped = wrap(runner)
        return wrapped
