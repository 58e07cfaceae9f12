"""ONNX Runtime backend.

``OrtGraph.run(feeds) -> dict`` is the plain interface every caller can use. For the decoder's hot
loop there is also :class:`OrtBinding` (ORT IO binding): inputs are passed by pointer, and outputs
can be written straight into caller-owned buffers, including the very buffers that are bound as
inputs (the in-place KV cache of an ORT engine build, see ``engines.ort_optimize``).

When the bundle holds an ORT engine build of a graph (``EngineRecord`` with ``backend="ort"``, made
once at export), the backend loads it instead of the portable graph and says how its KV cache must be
fed (``OrtGraph.facts``, a :class:`runtime.backends.RunnerFacts`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from runtime import deadline as _deadline
from runtime.backends import KV_CONCAT, RunnerFacts
from runtime.backends.int8_kernels import (
    X86_ARCHS,
    Int8Choice,
    Int8Kernel,
    apply_weight_form,
    calibrated_int8,
    choose,
)
from runtime.backends.nbits import NBITS_ACCURACY_LEVEL, lower_layers
from runtime.bundle_files import BundleFiles, Staging, printable
from runtime.errors import Blip2Error, Blip2Warning, require
from runtime.graph_check import PACKED_4BIT, ExternalTensor, check_graph, parse_graph, set_external
from runtime.manifest import EngineRecord, GraphRecord, OrtEngineFacts

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "int8": np.int8}
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "int8": "tensor(int8)"}  # how ORT names them (NodeArg.type)


def _x86() -> bool:
    import platform

    return platform.machine().lower() in X86_ARCHS


class OrtGraph:
    """One ONNX Runtime session. ``run`` is thread-safe (ORT sessions allow concurrent ``run``)."""

    def __init__(self, session, record: GraphRecord, *, kv_cache: str = KV_CONCAT, engine: str | None = None,
                 kv_dtype: str | None = None, int8: Int8Choice | None = None):
        self.session = session
        self.record = record
        self.calls = 0
        self._lock = threading.Lock()
        self._inputs = [t.name for t in record.io.inputs]
        self._outputs = [t.name for t in record.io.outputs]
        self._dtypes = {t.name: _DTYPES[t.dtype] for t in (*record.io.inputs, *record.io.outputs)}
        where = engine or record.file  # engine: the ORT engine build's file (None: the portable graph runs)
        if kv_dtype is not None:  # an engine that stores its KV cache in another type (manifest notes)
            if kv_dtype not in _DTYPES:
                raise Blip2Error(f"graph {where}: KV cache type {kv_dtype!r} is not one this runtime knows",
                                 hint="upgrade blip2-export, or rebuild the bundle with this version")
            for name in self._dtypes:
                if name.startswith(("past.", "present.")):
                    self._dtypes[name] = _DTYPES[kv_dtype]
        self.facts = RunnerFacts(file=where, engine=engine, kv_cache=kv_cache, kv_dtype=kv_dtype, int8=int8)
        got = [i.name for i in session.get_inputs()]
        if got != self._inputs:
            raise Blip2Error(f"graph {where} inputs {got} differ from the manifest's {self._inputs}",
                             hint="re-export the bundle")
        for i in session.get_inputs():  # the manifest (with its engine notes) must say what the graph takes
            want = _ORT_TYPES[np.dtype(self._dtypes[i.name]).name]
            if i.type != want:
                raise Blip2Error(f"graph {where} input {i.name} is {i.type}, the manifest says {want}",
                                 hint="re-export or rebuild the bundle")
        outs = {o.name: o for o in session.get_outputs()}
        if [o.name for o in session.get_outputs()] != self._outputs:
            raise Blip2Error(f"graph {where} outputs {list(outs)} differ from the manifest's {self._outputs}",
                             hint="re-export the bundle")
        specs = {t.name: t for t in (*record.io.inputs, *record.io.outputs)}
        for arg in (*session.get_inputs(), *session.get_outputs()):  # fixed dims: the graph and the model facts
            want_dims = specs[arg.name].dims
            got_dims = arg.shape if isinstance(arg.shape, (list, tuple)) else []
            if len(got_dims) == len(want_dims) and any(isinstance(g, int) and isinstance(w, int) and g != w
                                                         for g, w in zip(got_dims, want_dims)):
                raise Blip2Error(f"graph {where}: {arg.name} has dims {list(got_dims)}, the manifest's model facts "
                                 f"give {list(want_dims)}", hint="the manifest does not describe this graph: "
                                                                 "re-export the bundle")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise Blip2Error(f"graph {self.record.name}: missing inputs {missing}")
        args = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self._inputs}
        outs = self._guarded(lambda ro: self.session.run(self._outputs, args, ro))
        self._count()
        return dict(zip(self._outputs, outs))

    def _guarded(self, call):
        """Run ``call(run_options)`` under the request's deadline; ORT's failures become one-line errors."""
        d = _deadline.current()
        if d is not None:
            d.check()
        ro = d.ort_run_options(_ort()) if d is not None else None
        try:
            return call(ro)
        except Blip2Error:
            raise
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            if d is not None and d.expired:
                raise d.error() from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise Blip2Error(f"ONNX Runtime failed running graph {self.facts.file}: "
                             f"{printable(first)[:300]}", hint="the bundle's graph does not fit its manifest or this "
                                                               "input: re-export the bundle") from None

    def binding(self) -> OrtBinding:
        """A new IO binding for repeated runs of this graph (one per request: not shared across threads)."""
        return OrtBinding(self)

    def _count(self) -> None:
        with self._lock:
            self.calls += 1


class OrtBinding:
    """Inputs bound by pointer, outputs bound to caller buffers or left to ORT, kept across runs.

    Rebinding a name replaces it; bound arrays are referenced here so they outlive the runs. Outputs
    not bound to a buffer come back from :meth:`run` as numpy arrays.
    """

    def __init__(self, graph: OrtGraph):
        self.graph = graph
        self._io = graph.session.io_binding()
        self._keep: dict[str, np.ndarray] = {}
        self._out_order: list[str] = []  # ORT returns outputs in the order they were first bound
        self._fetch: set[str] = set()

    def input(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array, dtype=self.graph._dtypes[name])
        self._keep[name] = a
        self._io.bind_cpu_input(name, a)

    def output(self, name: str, buffer: np.ndarray | None = None) -> None:
        """Bind output ``name`` to ``buffer`` (C-contiguous, the output's exact shape), or let ORT allocate it."""
        if name not in self._out_order:
            self._out_order.append(name)
        if buffer is None:
            self._io.bind_output(name, "cpu")
            self._fetch.add(name)
            return
        if not buffer.flags.c_contiguous or buffer.dtype != self.graph._dtypes[name]:
            raise Blip2Error(f"output buffer for {name} must be C-contiguous {self.graph._dtypes[name].__name__}")
        self._keep["out:" + name] = buffer
        self._io.bind_output(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        self._fetch.discard(name)

    def run(self) -> dict[str, np.ndarray]:
        """Run once; return the outputs ORT allocated (those bound to buffers are already in place)."""
        for name in self._fetch:  # a fresh ORT allocation each run: output shapes change between runs
            self._io.bind_output(name, "cpu")
        self.graph._guarded(lambda ro: self.graph.session.run_with_iobinding(self._io, ro))
        self.graph._count()
        if not self._fetch:
            return {}
        values = self._io.get_outputs()
        return {n: values[i].numpy() for i, n in enumerate(self._out_order) if n in self._fetch}


class OrtBackend:
    name = "ort"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None, optimize: bool = True,
                 engines: bool = True, int8_kernel: str | Int8Kernel = Int8Kernel.AUTO,
                 staging_dir: str | None = None, lower_weights: bool = False):
        """``optimize``: ORT graph optimizations at load; ``engines``: load ORT engine builds of graphs
        (fused attention, in-place KV cache) when the bundle has them, else the portable graphs;
        ``int8_kernel``: the weight form of calibrated int8 graphs (``auto``: the exact one for this CPU,
        see :mod:`runtime.backends.int8_kernels`); ``staging_dir``: where the checked copies of graph data
        are made while a graph loads (default ``$BLIP2_EXPORT_STAGING_DIR``, else the temp dir);
        ``lower_weights``: also run the weight-only int8/int4 layers of portable graphs (those without an
        ORT engine) as MatMulNBits, as the engines' are (a build calibrates through its new decoder so)."""
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
        self.engines = engines
        self.int8_kernel = Int8Kernel.parse(int8_kernel)
        self.staging_dir = staging_dir
        self.lower_weights = lower_weights
        self._fp16_warned = False

    def int8_choice(self) -> Int8Choice:
        """The int8 weight form this backend loads calibrated int8 graphs in (probes the CPU once)."""
        return choose(self.int8_kernel, tuple(self.providers))

    def session_options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = (self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                       else self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # int4 graphs: ORT fuses DequantizeLinear(int4 blocks) -> MatMul into MatMulNBits with this level
        # (4: activations quantized to int8 per block, the fast kernel; it is ORT's default, said here)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(NBITS_ACCURACY_LEVEL))
        return so

    def engine_for(self, record: GraphRecord) -> tuple[EngineRecord, OrtEngineFacts] | None:
        """The ORT engine build of ``record`` this backend can run, with its facts, or None."""
        info = record.ort_engine
        if not self.engines or info is None or self.providers != ["CPUExecutionProvider"]:
            return None
        for e in record.engines:
            if e.backend == "ort" and e.file == info.file:
                return e, info
        return None

    def load(self, bundle: Path, record: GraphRecord, files: BundleFiles | None = None) -> OrtGraph:
        """Load ``record`` from bytes checked against the manifest, each bundle file read once.

        The graph is read into memory, parsed and walked (:mod:`runtime.graph_check`) before ORT sees it.
        Its external data files are copied into a private staging folder, hashed as they are copied
        (:meth:`BundleFiles.stage`), and ORT loads the checked copies by path: it reads (or maps) them
        itself, once, so the weights are never held twice in memory. The folder is removed as soon as the
        session exists."""
        if record.transform_spec.name == "fp16" and self.providers == ["CPUExecutionProvider"] and _x86() \
                and not self._fp16_warned:
            import warnings

            self._fp16_warned = True
            warnings.warn("fp16 on an x86 CPU runs as fp32: ONNX Runtime has no fp16 matmul kernels "
                          "there and keeps fp32 copies of the weights (more memory than the fp32 graphs, fp32 "
                          "speed); on this machine use --precision fp32 (exact) or int8 (fastest)",
                          Blip2Warning, stacklevel=2)
        files = files or BundleFiles(bundle)
        found = self.engine_for(record)
        # the runtime makes the quantized layers MatMulNBits: an engine's that says so, or (lower_weights)
        # a portable graph's weight-only ones
        lower = bool(found and found[1].lower_at_load) or (self.lower_weights and not found
                                                           and record.transform_spec.ort_engine == "weights")
        fuse4 = record.transform_spec.int4_weights and not lower  # else ORT fuses the int4 layers itself
        if fuse4 and _version(self.ort.__version__) < MIN_ORT_INT4:
            raise Blip2Error(f"the portable int4 graphs need ONNX Runtime {'.'.join(map(str, MIN_ORT_INT4))} or "
                             f"newer (it fuses their int4 blocks into MatMulNBits); this is {self.ort.__version__}",
                             hint="pip install -U 'onnxruntime>=1.20', or load the bundle's ORT engines")
        if found:
            # The engine's data files: its own, and the portable graph's where it shares equal weights.
            recs = {e.file: (e.sha256, e.bytes) for e in record.external_data}
            recs.update((e.file, (e.sha256, None)) for e in record.engines)
            file, digest = found[0].file, found[0].sha256
            listed = [(n, *recs[n]) for n in found[1].external_data if n in recs]
        else:
            file, digest = record.file, record.sha256
            listed = [(e.file, e.sha256, e.bytes) for e in record.external_data]
        raw = files.read(file, digest, limit=PROTOBUF_LIMIT, what="graph", as_bytes=True)
        model = parse_graph(raw, file)
        sizes = {name: files.size(name) for name, _, _ in listed}
        external = check_graph(model, sizes, file)
        used = {t.location for t in external}
        so = self.session_options()
        int8 = self.int8_choice() if calibrated_int8(record) else None
        with Staging(self.staging_dir) as staging:
            for name, sha, size in listed:
                if name in used:
                    files.stage(name, sha, size, staging)
            if int8 is not None and int8.ops:
                raw = _weight_form_model(model, int8, external, staging)
            elif lower:  # quantized layers in the portable form: MatMulNBits, staged
                raw = _lowered_model(model, external, staging)
            del model
            graph_path = staging.path(_free_name("graph.onnx", {n for n, _, _ in listed}))
            graph_path.write_bytes(raw)
            del raw
            # portable int4: MatMul + Add -> Gemm would run before (and so prevent) ORT's DequantizeLinear(int4)
            # -> MatMul -> MatMulNBits fusion, leaving those layers to dequantize their weights at every run
            off = ["MatMulAddFusion"] if fuse4 else []
            try:
                sess = self.ort.InferenceSession(str(graph_path), sess_options=so, providers=self.providers,
                                                 disabled_optimizers=off)
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise Blip2Error(f"ONNX Runtime cannot load {printable(file)}: {printable(first)[:300]}") from None
        if found:
            return OrtGraph(sess, record, kv_cache=found[1].kv_cache, engine=file, kv_dtype=found[1].kv_dtype,
                            int8=int8)
        return OrtGraph(sess, record, int8=int8)


MIN_ORT_INT4 = (1, 20)  # DequantizeLinear(int4 blocks) -> MatMul fused into MatMulNBits (ORT 1.19+)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``1.23.2`` or ``1.24.0.dev20250101``."""
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _ort():
    import onnxruntime

    return onnxruntime


_ONNX_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, prefixed with ``_`` until it is none of ``taken`` (the staged copies' names)."""
    while name in taken:
        name = "_" + name
    return name


PROTOBUF_LIMIT = 2**31 - 1


FORM_DATA = "form/weights.data"  # rewritten weights, beside the staged copies (no bundle name has a "/")


def _staged_tensor_loader(model, external: list[ExternalTensor], staging: Staging):
    """``load(name)``: the value of initializer ``name`` of ``model``, external ones read from their checked,
    staged copy (None for a name that is not an initializer; an int4 tensor as its packed bytes)."""
    from onnx import numpy_helper

    where = {t.name: t for t in external}
    inits = {t.name: t for t in model.graph.initializer}

    def load(name: str) -> np.ndarray | None:
        e = where.get(name)
        if e is None:
            if name not in inits:
                return None
            if inits[name].data_type in PACKED_4BIT:  # int4: the packed bytes
                return np.frombuffer(inits[name].raw_data, np.uint8)
            return numpy_helper.to_array(inits[name])
        if e.data_type in PACKED_4BIT:
            return np.fromfile(staging.path(e.location), np.uint8, count=e.length, offset=e.offset)
        if e.data_type not in _ONNX_NUMPY:
            return None
        dtype = np.dtype(_ONNX_NUMPY[e.data_type])
        arr = np.fromfile(staging.path(e.location), dtype, count=e.length // dtype.itemsize, offset=e.offset)
        return arr.reshape(e.dims)

    return load


class _StagedWriter:
    """New initializers into the staging folder's own data file (:data:`FORM_DATA`), 64-byte aligned."""

    def __init__(self, staging: Staging):
        self.path = staging.path(FORM_DATA)
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        self.file = open(self.path, "ab")  # noqa: SIM115 - closed by close()

    def tensor(self, arr: np.ndarray, name: str):
        from onnx import TensorProto, helper

        arr = np.ascontiguousarray(arr)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        self.external(t, memoryview(arr).cast("B"))  # the array's own bytes, not a copy
        return t

    def external(self, t, data) -> None:
        self.file.write(b"\0" * (-self.file.tell() % 64))
        offset = self.file.tell()
        set_external(t, FORM_DATA, offset, self.file.write(data))

    def close(self) -> None:
        self.file.close()


def _lowered_model(model, external: list[ExternalTensor], staging: Staging) -> bytes:
    """``model`` (already walked) with its weight-only int8 and int4 layers as MatMulNBits, serialized for
    ORT; each weight is read from its staged copy and the new layout written to the staging folder, one
    weight at a time (:func:`runtime.backends.nbits.lower_layers`)."""
    require("onnx", "cpu")
    writer = _StagedWriter(staging)
    try:
        lower_layers(model, _staged_tensor_loader(model, external, staging), writer.tensor)
    finally:
        writer.close()
    return model.SerializeToString()


def _weight_form_model(model, int8: Int8Choice, external: list[ExternalTensor], staging: Staging) -> bytes:
    """``model`` (already walked) with its quantized-product weights in the ``int8`` form, serialized for ORT.

    Rewritten in the graph rather than through ``SessionOptions.add_initializer``: ORT's QDQ Conv fusion
    reads the weight from the model before session-level initializers apply, so an override there is
    silently ignored (and u8u8 changes types). Each weight is read from its checked, staged copy; the
    rewritten ones go to a staged file of their own, so the graph stays small."""
    require("onnx", "cpu")
    from onnx import TensorProto

    load = _staged_tensor_loader(model, external, staging)
    apply_weight_form(model, int8.kernel, int8.ops, lambda t: load(t.name))
    writer = _StagedWriter(staging)
    try:
        for t in model.graph.initializer:  # the rewritten (now inline) tensors of any size go to the file
            if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= 1024:
                data = t.raw_data
                t.ClearField("raw_data")
                writer.external(t, data)
    finally:
        writer.close()
    return model.SerializeToString()
