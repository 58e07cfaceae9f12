"""Backends run one graph of a bundle: ``runner.run(feeds) -> outputs`` by the manifest's IO names.

``ort`` (ONNX Runtime: CPU, CUDA or TensorRT execution providers) and ``trt`` (native TensorRT
engines) sit behind the same interface, so the generation loop is the same for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import Blip2Error
from runtime.manifest import GraphRecord

BACKENDS = ("ort", "trt")


class GraphRunner(Protocol):
    record: GraphRecord
    calls: int

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, bundle: Path, record: GraphRecord, files=None) -> GraphRunner: ...  # files: BundleFiles


def create_backend(name: str = "ort", **options) -> Backend:
    if name == "ort":
        from runtime.backends.ort import OrtBackend

        return OrtBackend(**options)
    if name == "trt":
        from runtime.backends.trt import TrtBackend  # type: ignore[import-not-found]

        return TrtBackend(**options)
    raise Blip2Error(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


class GraphSet:
    """The graphs of one bundle precision, each loaded once on first use (thread-safe).

    A graph's files are read once when it is loaded, and those very bytes are checked against the manifest
    (when ``verify``) and handed to the backend (``runtime.bundle_files``), so a file changed under a running
    service is refused rather than run, and nothing is read again by path after the check. ``loaded`` maps
    graph name to runner; tests and calibration may wrap a runner in place.
    """

    def __init__(self, bundle: Path, manifest, precision: str, backend: Backend, verify: bool = True):
        import threading

        self.bundle, self.manifest, self.precision = Path(bundle), manifest, precision
        self.backend, self.verify = backend, verify
        self.loaded: dict[str, Any] = {}  # runners; tests and calibration may wrap one in place
        self._lock = threading.Lock()

    def get(self, name) -> GraphRunner:
        from runtime.bundle_files import BundleFiles

        key = name.value
        if key not in self.loaded:
            with self._lock:
                if key not in self.loaded:
                    rec = self.manifest.graph(name, self.precision)
                    self.loaded[key] = self.backend.load(self.bundle, rec, BundleFiles(self.bundle, verify=self.verify))
        return self.loaded[key]
