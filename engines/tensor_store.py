"""Graph weights kept on disk: read and written one tensor at a time (onnx + numpy, no torch).

A model loaded with :func:`load_lazy` holds no weight bytes: each large initializer stays an external-data
reference, its location made absolute so that a pass can read it (:func:`tensor_array`) wherever the model
came from. :func:`save_streaming` writes such a model back, copying or sharing the referenced bytes and
spilling tensors the passes created in memory, so no step ever holds a whole graph's weights. Passes that
create many large tensors hand each to a :class:`DataWriter` as they go (:func:`spill`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.errors import Blip2Error
from runtime.graph_check import set_external

# Tensors at least this large go to the external-data file (onnx.save_model's size_threshold does the same).
INLINE_MAX = 1024
ALIGN = 64  # offsets of tensors in a data file: aligned, so a reader may map them as arrays
COPY_CHUNK = 16 << 20


def is_external(t) -> bool:
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def external_info(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_nbytes(t) -> int:
    """Bytes of ``t``'s values, external or inline, without reading them."""
    if is_external(t):
        return int(external_info(t).get("length", 0))
    if t.raw_data:
        return len(t.raw_data)
    from onnx import helper

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _np_dtype(t):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(t.data_type)


def read_external_bytes(t) -> bytes:
    """The bytes of external tensor ``t``, whose location is absolute (:func:`load_lazy`)."""
    info = external_info(t)
    path = info["location"]
    offset, length = int(info.get("offset", 0)), info.get("length")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(int(length)) if length is not None else f.read()
    if length is not None and len(data) != int(length):

        raise Blip2Error(f"{path} ends before tensor {t.name!r} ({len(data)} of {length} bytes)")
    return data


def tensor_array(t) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads external tensors of a lazily loaded model, leaving ``t`` as is."""
    from onnx import numpy_helper

    if not is_external(t):
        return numpy_helper.to_array(t)
    arr = np.frombuffer(read_external_bytes(t), dtype=_np_dtype(t))
    return arr.reshape(tuple(t.dims))


def load_lazy(path: str | Path):
    """Load the graph at ``path`` without its external data: every external tensor keeps its reference,
    made absolute (``tensor_array`` reads it; :func:`save_streaming` writes it back relative)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    base = path.parent.resolve()
    for t in _all_tensors(model):
        if is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = str(base / e.value)
    return model


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def _clear_values(t) -> None:
    t.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)


class DataWriter:
    """Appends tensors to one external-data file (``location`` is its name beside the graph).

    Writes go to ``path`` directly; callers give a temporary path and rename it when the graph is done.
    Until then the tensors written refer to ``path`` itself (absolute), so a later pass can read them
    (:func:`tensor_array`); :func:`save_streaming` points them at ``location``.
    """

    def __init__(self, path: str | Path, location: str):
        self.path = Path(path).resolve()
        self.location = location
        self._f = open(self.path, "wb")  # noqa: SIM115 - appended to across calls; close() closes it
        self.offset = 0

    def _pad(self) -> None:
        pad = -self.offset % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad

    def append(self, t, data) -> None:
        """Write ``data`` (bytes or an array, in C order) as ``t``'s values and make ``t`` refer to them.

        A non-contiguous array (a transposed weight) is written in blocks of rows, never copied whole."""
        self._pad()
        if isinstance(data, np.ndarray):
            length = data.nbytes
            if data.flags.c_contiguous or data.ndim < 2:
                self._f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            else:
                rows = max(1, COPY_CHUNK // max(1, data[0].nbytes))
                for i in range(0, data.shape[0], rows):
                    self._f.write(memoryview(np.ascontiguousarray(data[i:i + rows])).cast("B"))
        else:
            self._f.write(data)
            length = len(data)
        self._f.flush()  # readable through its path by a later pass
        _clear_values(t)
        set_external(t, str(self.path), self.offset, length)
        self.offset += length

    def copy_external(self, t) -> None:
        """Copy external tensor ``t``'s bytes into this file in chunks and point ``t`` at the copy."""
        info = external_info(t)
        length = int(info["length"])
        self._pad()
        start = self.offset
        with open(info["location"], "rb") as src:
            src.seek(int(info.get("offset", 0)))
            left = length
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:

                    raise Blip2Error(f"{info['location']} ends before tensor {t.name!r}")
                self._f.write(chunk)
                left -= len(chunk)
        self._f.flush()
        set_external(t, str(self.path), start, length)
        self.offset += length

    def relocate(self, tensors) -> None:
        """Point the tensors written here at the file's final name beside the graph (``location``)."""
        here = str(self.path)
        for t in tensors:
            if is_external(t) and external_info(t)["location"] == here:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = self.location

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def make_tensor(array: np.ndarray, name: str, writer: DataWriter | None = None):
    """A ``TensorProto`` of ``array``: written straight to ``writer``'s file when large (no in-memory
    copy of its bytes), else holding them (``numpy_helper.from_array``)."""
    from onnx import TensorProto, helper, numpy_helper

    if writer is None or array.nbytes < INLINE_MAX:
        return numpy_helper.from_array(np.ascontiguousarray(array), name)
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    writer.append(t, array)
    return t


def spill(t, writer: DataWriter | None) -> None:
    """Move in-memory tensor ``t`` to ``writer``'s file (a no-op without a writer or for small tensors)."""
    if writer is None or is_external(t) or tensor_nbytes(t) < INLINE_MAX:
        return
    from onnx import numpy_helper

    data = t.raw_data if t.raw_data else numpy_helper.to_array(t)
    writer.append(t, data)


def weight_bytes(model) -> int:
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def save_streaming(model, path: str | Path, *, external_threshold: int, share: tuple[str | Path, ...] = (),
                   writer: DataWriter | None = None) -> list[str]:
    """Write ``model`` at ``path`` (a graph and at most one ``path.data``) without holding its weights.

    External tensors whose file is one of ``share`` (files beside ``path``) keep pointing there, so equal
    weights are stored once; other external tensors are copied in chunks; tensors in memory are written
    out. ``writer``: the data file a pass already spilled tensors into (``new_writer(path)``); it is
    closed and renamed here. Weights up to ``external_threshold`` bytes in all are stored inline instead.
    The data file is renamed into place before the graph. Returns the external files the graph refers
    to (relative names): the new data file first, then the shared ones it uses.
    """
    import onnx

    path = Path(path)
    shared = {str(Path(s).resolve()): Path(s).name for s in share}
    inits = list(_all_tensors(model))
    total = sum(tensor_nbytes(t) for t in inits)
    data_name = path.name + ".data"
    tmp_data = path.parent / f".{data_name}.tmp"
    tmp_graph = path.parent / f".{path.name}.tmp"
    used_shared: list[str] = []
    try:
        if total <= external_threshold and writer is None:
            for t in inits:
                if is_external(t):
                    t.raw_data = read_external_bytes(t)
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
            onnx.save_model(model, str(tmp_graph))
            os.replace(tmp_graph, path)
            return []
        writer = _compacted(writer, inits) if writer is not None else DataWriter(tmp_data, data_name)
        for t in inits:
            if is_external(t):
                loc = external_info(t)["location"]
                if loc == str(writer.path):  # spilled by a pass: already in the new file
                    continue
                if loc in shared:
                    for e in t.external_data:
                        if e.key == "location":
                            e.value = shared[loc]
                    if shared[loc] not in used_shared:
                        used_shared.append(shared[loc])
                elif tensor_nbytes(t) < INLINE_MAX:
                    t.raw_data = read_external_bytes(t)
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
                else:
                    writer.copy_external(t)
            elif tensor_nbytes(t) >= INLINE_MAX:
                spill(t, writer)
        writer.close()
        wrote = writer.offset > 0
        writer.relocate(inits)
        onnx.save_model(model, str(tmp_graph))
        if wrote:
            os.replace(writer.path, path.parent / data_name)
        os.replace(tmp_graph, path)
        return ([data_name] if wrote else []) + used_shared
    finally:
        if writer is not None:
            writer.close()
            if writer.path.exists():  # not renamed into place: an interrupted save
                writer.path.unlink()
        for p in (tmp_data, tmp_graph):
            if p.exists():
                p.unlink()


def _compacted(writer: DataWriter, inits: list) -> DataWriter:
    """``writer``, or a fresh file with only the tensors the graph still uses when passes dropped some of
    what they spilled (an engine packs the q/k/v weights it lowered a moment before)."""
    here = str(writer.path)
    live = [t for t in inits if is_external(t) and external_info(t)["location"] == here]
    if sum(tensor_nbytes(t) for t in live) + ALIGN * len(live) >= writer.offset:
        return writer
    writer.close()
    fresh = DataWriter(writer.path.with_name(writer.path.name + ".compact"), writer.location)
    for t in live:
        fresh.copy_external(t)
    writer.path.unlink()
    return fresh


def new_writer(path: str | Path) -> DataWriter:
    """A data writer for the graph that :func:`save_streaming` will write at ``path``."""
    path = Path(path)
    return DataWriter(path.parent / f".{path.name}.data.tmp", path.name + ".data")


class LinkedFolder:
    """A private folder beside the graph ``src`` holding links to its external data files, for graphs
    derived from it that ONNX Runtime must run (it reads external data only from the graph's own folder,
    by relative path: see :func:`point_at_links`). Hard links where the file system has them, else
    copies (disk, not memory). Removed on exit::

        with LinkedFolder(src) as work:
            onnx.save_model(point_at_links(derived), str(work / "g.onnx"))
    """

    def __init__(self, src: str | Path):
        self.src = Path(src)

    def __enter__(self) -> Path:
        import shutil
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix=".work-", dir=self.src.parent))
        try:
            for loc in {external_info(t)["location"] for t in load_lazy(self.src).graph.initializer
                        if is_external(t)}:
                dst = self.path / Path(loc).name
                if dst.exists():
                    continue
                try:
                    os.link(loc, dst)
                except OSError:
                    shutil.copyfile(loc, dst)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def point_at_links(model):
    """``model`` (read by :func:`load_lazy`: absolute external paths) with each external path made the
    plain name of its file: what a graph saved in a :class:`LinkedFolder` of the same source reads."""
    for t in _all_tensors(model):
        if is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = Path(e.value).name
    return model
