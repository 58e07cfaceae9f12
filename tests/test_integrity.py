"""Reliability 3: a bundle whose files were altered, truncated or swapped is refused, naming the file;
loading a bundle never executes code from it (no pickle, no code paths taken from the manifest)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import manifest_file_records

from runtime.contract import GraphName
from runtime.errors import Blip2Error, BundleError
from runtime.integrity import sha256_file
from runtime.manifest import MANIFEST_NAME, iter_files, load_manifest
from runtime.pipeline import Blip2Runtime

IMG = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


DAMAGE = {"bit-flip": _flip, "truncated": _truncate, "appended": _append, "emptied": _empty}


def test_bundle_files_are_all_covered(tiny_bundle):
    """Every file in the bundle folder except the manifest is vouched for by a checksum."""
    listed = {name for name, _, _ in iter_files(load_manifest(tiny_bundle))}
    present = {p.name for p in tiny_bundle.iterdir()} - {MANIFEST_NAME}
    assert present == listed


def _open_and_load(bundle: Path, **options) -> Blip2Runtime:
    """A runtime with every graph of its precision loaded (each file is checked when it is read)."""
    rt = Blip2Runtime(bundle, **options)
    for g in rt.manifest.required_graphs():
        rt.graph(GraphName(g))
    return rt


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_damaged_file_is_refused_by_name(tiny_bundle, tmp_path, damage):
    """Each file is refused by whichever runtime reads it: the default one (ORT engine builds) or the one
    that runs the portable graphs. Files a runtime does not use are not read at all (#13)."""
    m = load_manifest(tiny_bundle)
    unread = {r.file for role, r in m.files.items() if role not in ("tokenizer", "embed_tokens")}
    for name, _, _ in iter_files(m):
        bundle = tmp_path / f"{damage}-{name}"
        shutil.copytree(tiny_bundle, bundle)
        DAMAGE[damage](bundle / name)
        errors = []
        for options in ({}, {"engines": False}):
            try:
                _open_and_load(bundle, **options)
            except BundleError as e:
                errors.append(str(e))
        if not errors:  # a file no runtime reads (e.g. tokenizer_config.json, for transformers users) ...
            assert name in unread, f"{damage} {name} was not refused"
            with pytest.raises(BundleError) as e:  # ... is refused by the full check ('inspect')
                load_manifest(bundle)
            errors.append(str(e.value))
        for msg in errors:
            assert name in msg and ("checksum" in msg or "bytes" in msg), msg
            assert "re-export" in msg, msg
        shutil.rmtree(bundle)


def test_other_precisions_files_are_not_read(tiny_bundle, tmp_path):
    """Opening a precision reads its own files only: another precision's damaged graph does not stop it."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / MANIFEST_NAME).read_text())
    second = json.loads(json.dumps(m["graphs"]["fp32"]))  # a second precision: copies of the fp32 files
    for g in second.values():
        assert not g.get("external_data"), "the tiny graphs keep their weights inline"
        shutil.copy(bundle / g["file"], bundle / f"p2-{g['file']}")
        g["file"] = f"p2-{g['file']}"
        g["engines"] = []
        g.get("notes", {}).pop("ort_engine", None)
    m["graphs"]["fp16"] = second
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))
    _flip(bundle / second["vision"]["file"])  # same size, wrong bytes
    rt = _open_and_load(bundle, precision="fp32")
    assert rt.caption(IMG, max_new_tokens=2) is not None
    with pytest.raises(BundleError, match=r"p2-vision\.onnx does not match its checksum"):
        _open_and_load(bundle, precision="fp16")


def test_swapped_files_are_refused(tiny_bundle, bundle_copy, tmp_path):
    """Two graphs swapped with each other, and one graph replaced by the same graph of another export."""
    a, b = bundle_copy / "vision.onnx", bundle_copy / "qformer.onnx"
    tmp = tmp_path / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(BundleError, match=r"(vision|qformer)\.onnx"):
        _open_and_load(bundle_copy)


def test_graph_from_another_export_is_refused(tiny_bundle, tiny_checkpoint, tmp_path):
    from blip2_export.export import ExportConfig, export_bundle
    from blip2_export.modelzoo import make_random_checkpoint

    other_ck = make_random_checkpoint(tmp_path / "other-ck", "tiny", seed=7)
    other = export_bundle(other_ck, tmp_path / "other", ExportConfig(max_context=128, ort_engine=False),
                          progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_bundle, mixed)
    shutil.copy(other / "decoder.onnx", mixed / "decoder.onnx")  # a valid graph, of the same shape
    with pytest.raises(BundleError, match=r"decoder\.onnx does not match its checksum"):
        _open_and_load(mixed, engines=False)  # the runtime that reads the portable decoder
    (mixed / "decoder.onnx").unlink()
    (mixed / "decoder.onnx").symlink_to(other / "decoder.onnx")
    with pytest.raises(BundleError, match=r"decoder\.onnx"):
        Blip2Runtime(mixed)  # a symlink: refused when the names are resolved, before anything is read


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx"])
def test_manifest_cannot_point_outside_the_bundle(bundle_copy, name):
    (bundle_copy.parent / "outside.onnx").write_bytes((bundle_copy / "vision.onnx").read_bytes())
    m = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    m["graphs"]["fp32"]["vision"]["file"] = name
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        Blip2Runtime(bundle_copy)


def test_ort_engine_notes_must_name_a_checksummed_engine(bundle_copy):
    """The file the ORT backend loads instead of the portable graph must be one the manifest vouches for."""
    m = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    m["graphs"]["fp32"]["decoder"]["notes"]["ort_engine"]["file"] = "vision.onnx"
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="ort_engine"):
        Blip2Runtime(bundle_copy)


# ------------------------------------------------------------------------------------ no code execution
class _Payload:
    """Unpickling this creates ``marker``: proof that code from the bundle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(bundle: Path, name: str, data: bytes) -> None:
    """Replace ``name`` with ``data`` and fix its checksum and size in the manifest (a forged bundle)."""
    (bundle / name).write_bytes(data)
    m = json.loads((bundle / MANIFEST_NAME).read_text())

    def fix(rec: dict) -> None:
        if rec.get("file") == name:
            rec["sha256"] = sha256_file(bundle / name)
            if "bytes" in rec:
                rec["bytes"] = len(data)

    for rec in manifest_file_records(m):
        fix(rec)
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))


def _pickled_npy(marker: Path) -> bytes:
    """A valid .npy of dtype object: loading it with allow_pickle=True would run the payload."""
    import io

    arr = np.empty((2, 2), dtype=object)
    arr[0, 0] = _Payload(marker)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("name,data_kind", [("embed_tokens.npy", "npy"), ("tokenizer.json", "pickle"),
                                            ("decoder.onnx", "pickle"), ("decoder.ort.onnx", "pickle"),
                                            ("vision.onnx", "pickle")])
def test_forged_pickle_never_runs(bundle_copy, tmp_path, name, data_kind):
    marker = tmp_path / "pwned"
    data = _pickled_npy(marker) if data_kind == "npy" else pickle.dumps(_Payload(marker))
    _plant(bundle_copy, name, data)
    load_manifest(bundle_copy)  # checksums match: the forgery is only caught by reading the file
    with pytest.raises(Blip2Error) as e:
        # the portable decoder.onnx runs only when the ORT engine build is not used
        rt = Blip2Runtime(bundle_copy, engines=name != "decoder.onnx")
        rt.generate([IMG], ["a photo of"], max_new_tokens=2)
    assert not marker.exists(), "code from the bundle was executed"
    assert name in str(e.value) or "ONNX Runtime" in str(e.value), e.value


_SEEN: list[str] = []
_WATCHING = [False]
_WATCHED = {"pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "builtins.input"}


def _audit(event: str, args) -> None:
    if _WATCHING[0] and event in _WATCHED:
        _SEEN.append(event)


def test_loading_and_running_unpickles_nothing_and_spawns_nothing(tiny_bundle):
    """Python's audit hooks see every unpickled class and every process spawned: none while loading and
    running a bundle (the embedding table is read with allow_pickle=False, graphs by ONNX Runtime)."""
    sys.addaudithook(_audit)  # stays installed; it records only while _WATCHING is set
    _WATCHING[0] = True
    try:
        rt = Blip2Runtime(tiny_bundle)
        rt.generate([IMG, IMG], ["a photo of", ""], max_new_tokens=3, num_beams=2)
    finally:
        _WATCHING[0] = False
    assert _SEEN == [], _SEEN
    _WATCHING[0] = True  # the hook itself works: it does see a real unpickle
    try:
        pickle.loads(pickle.dumps(Path("x")))
    finally:
        _WATCHING[0] = False
    assert _SEEN == ["pickle.find_class"], "the audit hook did not see a real unpickle"


def test_runtime_source_has_no_code_loading_paths():
    """The runtime never unpickles, evals or loads custom-op libraries (which could come from a bundle)."""
    forbidden = [r"\bimport pickle\b", r"allow_pickle\s*=\s*True", r"torch\.load", r"(?<![\w.])eval\(",
                 r"(?<![\w.])exec\(", r"register_custom_ops_library", r"\bmarshal\b", r"\bdill\b", r"joblib"]
    hits = []
    for path in RUNTIME.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for pat in forbidden:
                if re.search(pat, line):
                    hits.append(f"{path.relative_to(RUNTIME.parent)}:{i}: {line.strip()}")
    assert hits == [], "\n".join(hits)


def test_graph_altered_after_the_runtime_started_is_refused(bundle_copy):
    """Checksums are verified when the runtime is constructed; a graph file replaced before its first use
    (a bundle updated under a running service) must be refused, not run."""
    import onnx
    from onnx import numpy_helper

    rt = Blip2Runtime(bundle_copy)
    model = onnx.load(str(bundle_copy / "vision.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(bundle_copy / "vision.onnx"))  # a valid graph that computes something else
    with pytest.raises(BundleError, match=r"vision\.onnx"):
        rt.image_features([IMG])
