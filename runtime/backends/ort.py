"""ONNX Runtime backend."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from runtime.errors import Blip2Error, require
from runtime.manifest import GraphRecord

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class OrtGraph:
    """One ONNX Runtime session. ``run`` is thread-safe (ORT sessions allow concurrent ``run``)."""

    def __init__(self, session, record: GraphRecord):
        self.session = session
        self.record = record
        self.calls = 0
        self._lock = threading.Lock()
        self._inputs = [t.name for t in record.io.inputs]
        self._outputs = [t.name for t in record.io.outputs]
        self._dtypes = {t.name: _DTYPES[t.dtype] for t in record.io.inputs}
        got = [i.name for i in session.get_inputs()]
        if got != self._inputs:
            raise Blip2Error(f"graph {record.file} inputs {got} differ from the manifest's {self._inputs}",
                             hint="re-export the bundle")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise Blip2Error(f"graph {self.record.name}: missing inputs {missing}")
        args = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self._inputs}
        outs = self.session.run(self._outputs, args)
        with self._lock:
            self.calls += 1
        return dict(zip(self._outputs, outs))


class OrtBackend:
    name = "ort"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None, optimize: bool = True):
        self.ort = require("onnxruntime", "cpu")
        available = self.ort.get_available_providers()
        self.providers = providers or ["CPUExecutionProvider"]
        unknown = [p for p in self.providers if p not in available]
        if unknown:
            extra = "trt" if any("Tensorrt" in p for p in unknown) else "gpu"
            raise Blip2Error(f"ONNX Runtime execution providers {unknown} are not available here "
                             f"(available: {', '.join(available)})", hint=f"pip install 'blip2-export[{extra}]'")
        self.threads = threads
        self.optimize = optimize

    def session_options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = (self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                       else self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def load(self, bundle: Path, record: GraphRecord) -> OrtGraph:
        path = Path(bundle) / record.file
        try:
            sess = self.ort.InferenceSession(str(path), sess_options=self.session_options(),
                                             providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise Blip2Error(f"ONNX Runtime cannot load {record.file}: {str(e).splitlines()[0]}") from None
        return OrtGraph(sess, record)
