"""Native TensorRT backend: engines built by ``blip2-export build --backend trt``, run with CUDA buffers.

An engine (``<graph>.<precision>.plan``) is only valid on the GPU model (compute capability) and the
TensorRT version it was built with; the manifest's :class:`EngineRecord` says which. Loading checks
that first (:func:`check_engine`, a pure function tested without a GPU) and tells the user to rebuild.

``tensorrt`` and ``cuda-python`` are optional (``pip install 'blip2-export[trt]'``) and imported lazily.
Note that ``tensorrt-stubs`` (type stubs) make ``import tensorrt`` succeed without the library, so
:func:`tensorrt_status` checks for the real module.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from runtime.backends import RunnerFacts
from runtime.bundle_files import BundleFiles
from runtime.errors import Blip2Error, BundleError, MissingDependencyError
from runtime.manifest import EngineRecord, GraphRecord

if TYPE_CHECKING:
    import tensorrt as trt



@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to: GPU name, compute capability ("8.6") and TensorRT version."""

    name: str
    compute_capability: str
    backend_version: str


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt_module
    except ImportError as e:
        raise MissingDependencyError(f"tensorrt is not installed ({e})",
                                     hint="pip install 'blip2-export[trt]'") from None
    if not hasattr(trt_module, "Builder"):  # only tensorrt-stubs (a namespace package) is installed
        raise MissingDependencyError("tensorrt is not installed (only its type stubs are)",
                                     hint="pip install 'blip2-export[trt]'")
    return trt_module


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise MissingDependencyError(f"cuda-python is not installed ({e})",
                                         hint="pip install 'blip2-export[trt]'") from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return ``(err, *values)``; raise on an error, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise Blip2Error(f"CUDA error in {what}: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, after checking that a CUDA GPU is present; a one-line error otherwise."""
    trt_module = _import_tensorrt()
    current_device()
    return trt_module


def tensorrt_status() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else the reason they are not."""
    try:
        require_tensorrt()
    except Blip2Error as e:
        return str(e)
    return None


def current_device(index: int = 0) -> DeviceInfo:
    trt_module = _import_tensorrt()
    cudart = _import_cudart()
    try:
        count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except Blip2Error:
        count = 0
    if not count:
        raise Blip2Error("no CUDA GPU is visible, so TensorRT cannot run here",
                         hint="use --backend ort (ONNX Runtime runs every precision on CPU)")
    prop = _check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name.strip("\x00 "), f"{prop.major}.{prop.minor}", str(trt_module.__version__))


def check_engine(engine: EngineRecord, device: DeviceInfo, rebuild: str = "") -> None:
    """Raise :class:`BundleError` saying to rebuild when ``engine`` was built for another device/TensorRT."""
    problems = []
    if engine.compute_capability != device.compute_capability:
        problems.append(f"compute capability {engine.compute_capability} (this GPU: {device.compute_capability})")
    if engine.device_name != device.name:
        problems.append(f"GPU {engine.device_name!r} (this GPU: {device.name!r})")
    if engine.backend_version != device.backend_version:
        problems.append(f"TensorRT {engine.backend_version} (installed: {device.backend_version})")
    if problems:
        raise BundleError(f"TensorRT engine {engine.file} was built for " + ", ".join(problems)
                          + "; engines only run on the GPU model and TensorRT version they were built with",
                          hint=f"rebuild it here: {rebuild or 'blip2-export build BUNDLE --backend trt'}")


def select_engine(record: GraphRecord, device: DeviceInfo) -> EngineRecord:
    """The engine of ``record`` built for ``device``; a rebuild message when there is none."""
    rebuild = f"blip2-export build BUNDLE --precision {record.precision} --backend trt"
    engines = [e for e in record.engines if e.backend == "trt"]
    if not engines:
        raise BundleError(f"the {record.precision} {record.name!r} graph has no TensorRT engine",
                          hint=f"build one: {rebuild}")
    for e in engines:
        try:
            check_engine(e, device, rebuild)
            return e
        except BundleError:
            continue
    check_engine(engines[-1], device, rebuild)  # raises, with the reason for the newest engine
    raise AssertionError("unreachable")


class TrtGraph:
    """One engine + execution context. Device buffers are allocated once per tensor and grown on demand.

    ``run`` takes and returns numpy arrays by the manifest's IO names (the generation loop is shared with
    ONNX Runtime); calls are serialised by a lock, since an execution context is not thread-safe.
    """

    def __init__(self, trt_module: Any, cudart: Any, engine: trt.ICudaEngine, record: GraphRecord, file: str):
        self.trt, self.cudart, self.engine, self.record = trt_module, cudart, engine, record
        self.facts = RunnerFacts(file=file, engine=file)
        self.context: trt.IExecutionContext = engine.create_execution_context()
        if self.context is None:
            raise Blip2Error(f"TensorRT could not create an execution context for {record.name}")
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.calls = 0
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._inputs = [t.name for t in record.io.inputs]
        self._outputs = [t.name for t in record.io.outputs]
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        missing = [n for n in (*self._inputs, *self._outputs) if n not in names]
        if missing:
            raise BundleError(f"engine for {record.name} lacks tensors {missing} that the manifest declares",
                              hint="rebuild it with 'blip2-export build --backend trt --force'")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                _check(self.cudart.cudaFree(ptr), "cudaFree")
            size = max(nbytes, 1, size * 2)
            ptr = int(_check(self.cudart.cudaMalloc(size), "cudaMalloc"))
            self._buffers[name] = (ptr, size)
        return ptr

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise Blip2Error(f"graph {self.record.name}: missing inputs {missing}")
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            hold = []
            for n in self._inputs:
                arr = np.ascontiguousarray(feeds[n], dtype=self._dtype(n))
                hold.append(arr)
                if not self.context.set_input_shape(n, tuple(arr.shape)):
                    raise Blip2Error(f"{self.record.name}: input {n} shape {tuple(arr.shape)} is outside the "
                                     "engine's optimization profile",
                                     hint="rebuild with a larger --max-batch / --max-context")
                ptr = self._buffer(n, arr.nbytes)
                if arr.nbytes:
                    _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "memcpy")
                self.context.set_tensor_address(n, ptr)
            outs = {}
            for n in self._outputs:
                dims = self.context.get_tensor_shape(n)
                shape = tuple(int(dims[i]) for i in range(len(dims)))
                out = np.empty(shape, dtype=self._dtype(n))
                outs[n] = out
                self.context.set_tensor_address(n, self._buffer(n, out.nbytes))
            if not self.context.execute_async_v3(self.stream):
                raise Blip2Error(f"TensorRT failed to run {self.record.name}")
            for n, out in outs.items():
                if out.nbytes:
                    _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[n][0], out.nbytes, d2h,
                                                  self.stream), "memcpy")
            _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            self.calls += 1
            del hold
        return outs

    def binding(self) -> NoReturn:
        raise Blip2Error(f"graph {self.record.name}: TensorRT engines run through run(); they have no in-place "
                         "KV binding (facts.kv_cache is concat)")

    def __del__(self) -> None:
        try:
            for ptr, _ in self._buffers.values():
                self.cudart.cudaFree(ptr)
            self.cudart.cudaStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001, S110 - CUDA may already be torn down at interpreter exit
            pass


class TrtBackend:
    name = "trt"

    def __init__(self, device: int = 0):
        self.trt = require_tensorrt()
        self.cudart = _import_cudart()
        _check(self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.device = current_device(device)
        import tensorrt as trt

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime: trt.Runtime = trt.Runtime(self.logger)

    def load(self, bundle: Path, record: GraphRecord, files=None) -> TrtGraph:

        engine_rec = select_engine(record, self.device)
        files = files or BundleFiles(bundle)
        data = files.read(engine_rec.file, engine_rec.sha256, what="engine", as_bytes=True)  # checked bytes
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT cannot load {engine_rec.file}",
                              hint=f"rebuild it: blip2-export build BUNDLE --precision {record.precision} "
                                   "--backend trt --force")
        return TrtGraph(self.trt, self.cudart, engine, record, engine_rec.file)
