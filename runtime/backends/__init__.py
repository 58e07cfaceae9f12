"""Backends run one graph of a bundle: ``runner.run(feeds) -> outputs`` by the manifest's IO names.

``ort`` (ONNX Runtime: CPU, CUDA or TensorRT execution providers) and ``trt`` (native TensorRT
engines) sit behind the same interface, so the generation loop is the same for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

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

    def load(self, bundle: Path, record: GraphRecord) -> GraphRunner: ...


def create_backend(name: str = "ort", **options) -> Backend:
    if name == "ort":
        from runtime.backends.ort import OrtBackend

        return OrtBackend(**options)
    if name == "trt":
        from runtime.backends.trt import TrtBackend  # type: ignore[import-not-found]

        return TrtBackend(**options)
    raise Blip2Error(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
