"""A bundle is untrusted input: each attack of issue 14, built from a real exported bundle.

Every case asserts the one-line error (exit 2, no traceback), that a secret file outside the bundle never
appears in any output and that files outside the bundle are not changed, and that it ends in seconds.
The external-data cases test the project's own graph walk directly, so they hold on any ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import manifest_file_records

from blip2_export.cli import main
from runtime.bundle_files import BundleFiles, check_name, printable
from runtime.contract import GraphName
from runtime.errors import Blip2Error, BundleError, InputError, LimitError
from runtime.graph_check import check_bundle_graphs, check_graph, parse_graph
from runtime.integrity import sha256_file
from runtime.manifest import MANIFEST_NAME, load_manifest
from runtime.pipeline import Blip2Runtime

SECRET = b"TOP-SECRET-0123456789abcdef"  # 27 bytes; never to be seen in any output
IMG = str(Path(__file__).resolve().parents[1] / "blip2_export" / "assets" / "sample_images" / "sample_0.png")


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "outside" / "secret.txt"
    p.parent.mkdir()
    p.write_bytes(SECRET * 4096)  # enough bytes for any tensor the attacks point at it
    return p


def edit_manifest(bundle: Path, fn) -> None:
    m = json.loads((bundle / MANIFEST_NAME).read_text())
    fn(m)
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))


def rehash(bundle: Path) -> None:
    """Recompute every record's sha256 and size: the attacker controls the manifest too."""
    def fix(rec):
        p = bundle / rec["file"]
        if p.is_file() and not p.is_symlink():
            rec["sha256"] = sha256_file(p)
            if "bytes" in rec:
                rec["bytes"] = p.stat().st_size

    def walk(m):
        for rec in manifest_file_records(m):
            fix(rec)
    edit_manifest(bundle, walk)


def cli(capsys, *args, limit_s: float = 20.0):
    """Run the CLI in-process: (exit code, stdout, stderr); asserts it ended within ``limit_s``."""
    t0 = time.monotonic()
    rc = main([str(a) for a in args])
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert took < limit_s, f"took {took:.1f} s"
    return rc, out, err


def assert_refused(rc, out, err, *, match: str = ""):
    assert rc == 2, (rc, out, err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert SECRET[:10].decode() not in out + err
    assert match in err, err


def externalize(bundle: Path, graph: str, location: str) -> str:
    """Make ``graph``'s largest initializer read its values from ``location`` (as ONNX external data)."""
    import onnx

    model = onnx.load(str(bundle / graph), load_external_data=False)
    t = max(model.graph.initializer, key=lambda x: len(x.raw_data))
    n = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(model, str(bundle / graph))
    return t.name


# ------------------------------------------------------------------------------------ 1. external data
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "unlisted"])
def test_external_data_outside_the_listed_files_is_refused_by_our_walk(bundle_copy, secret, capsys, kind):
    """The project's own walk refuses the graph (on any ORT version), and so does every command."""
    loc = {"dotdot": os.path.relpath(secret, bundle_copy), "absolute": str(secret), "symlink": "w.data",
           "unlisted": "w.data"}[kind]
    if kind == "symlink":
        (bundle_copy / "w.data").symlink_to(secret)
    if kind == "unlisted":
        (bundle_copy / "w.data").write_bytes(SECRET * 4096)  # inside the bundle, but not in the manifest
    externalize(bundle_copy, "vision.onnx", loc)
    rehash(bundle_copy)
    raw = (bundle_copy / "vision.onnx").read_bytes()
    with pytest.raises(BundleError, match="not one of this graph's listed data files"):
        check_graph(parse_graph(raw, "vision.onnx"), {}, "vision.onnx")  # no ORT involved
    with pytest.raises(BundleError, match="listed data files"):
        check_bundle_graphs(bundle_copy, load_manifest(bundle_copy))
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG, "--max-new-tokens", "3"), match="vision.onnx")
    assert_refused(*cli(capsys, "inspect", bundle_copy), match="listed data files")  # never "checksums: ok"
    assert_refused(*cli(capsys, "build", bundle_copy, "--precision", "fp16", "--backend", "ort"),
                   match="listed data files")  # the fp16 transform never loads it


def test_listed_external_data_symlink_is_refused(bundle_copy, secret, capsys):
    """Listing the symlink in the manifest (with the secret's checksum) does not help."""
    (bundle_copy / "w.data").symlink_to(secret)
    externalize(bundle_copy, "vision.onnx", "w.data")

    def add(m):
        m["graphs"]["fp32"]["vision"]["external_data"] = [
            {"file": "w.data", "sha256": sha256_file(secret), "bytes": secret.stat().st_size}]
    edit_manifest(bundle_copy, add)
    rehash(bundle_copy)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG), match="symbolic link")
    assert_refused(*cli(capsys, "inspect", bundle_copy, "--no-verify"), match="symbolic link")


@pytest.fixture
def externalized(bundle_copy, tiny_bundle):
    """bundle_copy whose vision graph keeps its largest tensor in a listed ``vision.onnx.data``."""
    import onnx

    model = onnx.load(str(tiny_bundle / "vision.onnx"))
    t = max(model.graph.initializer, key=lambda x: len(x.raw_data))
    (bundle_copy / "vision.onnx.data").write_bytes(t.raw_data)
    externalize(bundle_copy, "vision.onnx", "vision.onnx.data")

    def add(m):
        m["graphs"]["fp32"]["vision"]["external_data"] = [{"file": "vision.onnx.data", "sha256": "0" * 64,
                                                           "bytes": 0}]
    edit_manifest(bundle_copy, add)
    rehash(bundle_copy)
    return bundle_copy


def test_external_data_from_listed_file_runs_and_is_read_once(externalized, tiny_bundle, monkeypatch):
    """Each bundle file is opened once; ORT gets a private, checked copy (never a bundle path): same caption."""
    import stat

    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(src, *a, **k):
        folder = Path(src).parent
        seen.append((Path(src), stat.S_IMODE(folder.stat().st_mode),
                     (folder / "vision.onnx.data").read_bytes() if (folder / "vision.onnx.data").exists() else None))
        return real(src, *a, **k)

    opened = []
    real_open = os.open

    def open_spy(path, *a, **k):
        if os.path.dirname(os.path.realpath(path)) == os.path.realpath(externalized):
            opened.append(os.path.basename(path))  # a file of the bundle (not a staged copy)
        return real_open(path, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(os, "open", open_spy)
    got = Blip2Runtime(externalized).caption(IMG, max_new_tokens=4)
    monkeypatch.undo()
    assert got == Blip2Runtime(tiny_bundle).caption(IMG, max_new_tokens=4)
    assert opened.count("vision.onnx.data") == 1 and opened.count("vision.onnx") == 1, opened
    bundle = os.path.realpath(externalized)
    assert seen and all(not str(src).startswith(bundle) and mode == 0o700 for src, mode, _ in seen), seen
    assert (externalized / "vision.onnx.data").read_bytes() in [data for _, _, data in seen]
    assert not any(src.parent.exists() for src, _, _ in seen), "the staged copies are removed after loading"
    assert "checksums: ok" in _inspect_out(externalized)


def _inspect_out(bundle):
    from click.testing import CliRunner

    from blip2_export.cli import cli as group

    return CliRunner().invoke(group, ["inspect", str(bundle)]).output


def test_unlisted_external_data_edit_is_caught(externalized, capsys):
    """Before: a data file the manifest did not list was never hashed. Now it must be listed (and hashed)."""
    edit_manifest(externalized, lambda m: m["graphs"]["fp32"]["vision"].update(external_data=[]))
    data = bytearray((externalized / "vision.onnx.data").read_bytes())
    data[0] ^= 0xFF
    (externalized / "vision.onnx.data").write_bytes(bytes(data))
    assert_refused(*cli(capsys, "inspect", externalized), match="listed data files")


@pytest.mark.parametrize("where", ["constant", "subgraph_init", "sparse"])
def test_external_data_only_in_top_level_initializers(where):
    """Constant attributes, subgraph initializers and sparse initializers may not be external at all."""
    import onnx
    from onnx import TensorProto, helper

    def ext(name):
        t = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "w.data"
        return t

    nodes, inits, sparse = [], [], []
    if where == "constant":
        nodes.append(helper.make_node("Constant", [], ["c"], value=ext("c")))
    elif where == "subgraph_init":
        body = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "body", [],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])], [ext("s")])
        nodes.append(helper.make_node("Identity", ["x"], ["c"]))
        nodes[-1].attribute.append(helper.make_attribute("g", body))
    else:
        sparse.append(helper.make_sparse_tensor(ext("v"), helper.make_tensor("i", TensorProto.INT64, [2], [0, 1]),
                                                [4]))
    g = helper.make_graph(nodes or [helper.make_node("Identity", ["x"], ["c"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])], inits)
    g.sparse_initializer.extend(sparse)
    raw = helper.make_model(g).SerializeToString()
    with pytest.raises(BundleError, match="outside the graph"):
        check_graph(parse_graph(raw, "x.onnx"), {"w.data": 1 << 20}, "x.onnx")
    assert onnx  # the walk needs onnx, not ORT


@pytest.mark.parametrize("op", ["Loop", "Scan", "If"])
def test_control_flow_operators_are_refused(bundle_copy, capsys, op):
    """A Loop of 10**15 iterations would hang; such operators never reach ORT."""
    import onnx
    from onnx import helper

    model = onnx.load(str(bundle_copy / "vision.onnx"))
    model.graph.node.append(helper.make_node(op, ["pixel_values"], ["junk"]))
    onnx.save(model, str(bundle_copy / "vision.onnx"))
    rehash(bundle_copy)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG), match=f"operator '{op}'")


def test_every_exported_graph_passes_the_walk(tiny_bundle):
    assert check_bundle_graphs(tiny_bundle, load_manifest(tiny_bundle)) == 4  # 3 graphs + decoder engine


# ---------------------------------------------------------------------------------- 2. deletes outside
def test_build_never_deletes_outside_the_bundle(bundle_copy, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "known.txt").write_bytes(b"keep me")
    (bundle_copy / "d").symlink_to(elsewhere, target_is_directory=True)

    def stale(m):
        rec = json.loads(json.dumps(m["graphs"]["fp32"]["vision"]))
        rec.update(precision="fp16", file="vision.fp16.onnx", external_data=[{"file": "d/known.txt", "sha256": sha256_file(
            elsewhere / "known.txt"), "bytes": 7}], engines=[], notes={})
        m["graphs"]["fp16"] = {"vision": rec}
    edit_manifest(bundle_copy, stale)
    assert_refused(*cli(capsys, "build", bundle_copy, "--precision", "fp16", "--backend", "ort", "--force"),
                   match="d/known.txt")
    assert (elsewhere / "known.txt").read_bytes() == b"keep me"


@pytest.mark.parametrize("victim", ["vision.onnx", "tokenizer.json"])
def test_stale_records_naming_bundle_files_delete_nothing(bundle_copy, capsys, victim):
    before = (bundle_copy / victim).read_bytes()

    def stale(m):
        rec = json.loads(json.dumps(m["graphs"]["fp32"]["vision"]))
        rec.update(precision="fp16", file=victim, engines=[], notes={})
        m["graphs"]["fp16"] = {"vision": rec}
    edit_manifest(bundle_copy, stale)
    rehash(bundle_copy)
    assert_refused(*cli(capsys, "build", bundle_copy, "--precision", "fp16", "--backend", "ort", "--force"),
                   match="one role")
    assert (bundle_copy / victim).read_bytes() == before


def test_stale_file_removal_only_unlinks_plain_files_in_the_bundle(bundle_copy, tmp_path):
    from engines.build import remove_stale_files

    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (bundle_copy / "link.txt").symlink_to(outside)
    (bundle_copy / "old.fp16.onnx").write_text("old")
    remove_stale_files(bundle_copy, {"../outside.txt", str(outside), "link.txt", "old.fp16.onnx", "d/x"})
    assert outside.read_text() == "x" and (bundle_copy / "link.txt").is_symlink()
    assert not (bundle_copy / "old.fp16.onnx").exists()


# ------------------------------------------------------------------------------ 3. trainer checkpoints
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_runs_code_from_a_checkpoint(tmp_path):
    import torch

    from trainer.train import load_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "step": 1, "config": "{}", "x": _Payload(marker)},
               evil)
    with pytest.raises(Blip2Error, match="read safely") as e:
        load_checkpoint(evil)
    assert not marker.exists()
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ 4. check-then-use race
def test_graph_swapped_during_loads_never_runs(bundle_copy):
    """A thread swaps vision.onnx between the real graph and a forged one (same name, other weights) while
    runtimes load it: each load either runs the real graph or is refused: the hashed bytes are the bytes run."""
    import onnx
    from onnx import numpy_helper

    good = (bundle_copy / "vision.onnx").read_bytes()
    model = onnx.load_from_string(good)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    evil = model.SerializeToString()
    pv = Blip2Runtime(bundle_copy).pixel_values([IMG])
    ref = Blip2Runtime(bundle_copy).image_embeds(pv)
    stop = threading.Event()

    def swap():
        tmp = bundle_copy / ".swap"
        while not stop.is_set():
            for data in (evil, good):
                tmp.write_bytes(data)
                os.replace(tmp, bundle_copy / "vision.onnx")

    t = threading.Thread(target=swap)
    t.start()
    ran = refused = 0
    try:
        rt = Blip2Runtime(bundle_copy, verify=False)  # manifest checked once; graph bytes checked at load
        rt.verify = True
        from runtime.backends import GraphSet

        for _ in range(60):
            gs = GraphSet(bundle_copy, rt.manifest, "fp32", rt.backend, verify=True)
            try:
                out = gs.get(GraphName.VISION).run({"pixel_values": pv})["image_embeds"]
            except BundleError:
                refused += 1
                continue
            assert np.array_equal(out, ref), "a graph other than the checksummed one ran"
            ran += 1
    finally:
        stop.set()
        t.join()
    assert ran + refused == 60 and refused > 0


def test_embedding_table_is_private_memory(bundle_copy):
    """Editing or truncating embed_tokens.npy after load changes nothing (no live mmap, no SIGBUS)."""
    rt = Blip2Runtime(bundle_copy)
    before = rt.caption(IMG, max_new_tokens=6)
    assert not isinstance(rt.embed, np.memmap)
    path = bundle_copy / "embed_tokens.npy"
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: same inode, what a live mmap would see
        f.seek(200)
        f.write(b"\x7f" * (size - 200))
    assert rt.caption(IMG, max_new_tokens=6) == before
    with open(path, "r+b") as f:
        f.truncate(130)
    assert rt.caption(IMG, max_new_tokens=6) == before


# ------------------------------------------------------------------------------- 5. resources and hangs
@pytest.mark.parametrize("edit,match", [
    (lambda m: (m["model"].update(image_size=40000), m["preprocess"].update(height=40000, width=40000)),
     "image_size=40000"),
    (lambda m: m["generation"].update(num_beams=2**20), "num_beams"),
    (lambda m: m["generation"].update(max_new_tokens=2**24), "max_new_tokens"),
    (lambda m: m["dims"]["batch"].update(max=2**24), "dims.batch.max"),
    (lambda m: m["model"].update(max_context=2**24), "max_context"),
])
def test_manifest_resource_bombs_are_refused_before_any_work(bundle_copy, capsys, edit, match):
    edit_manifest(bundle_copy, edit)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG, limit_s=10), match=match)


def test_many_records_of_one_file_are_refused_fast(bundle_copy, capsys):
    """100,000 records naming one file: refused from the manifest, nothing hashed 100,000 times."""
    def many(m):
        rec = {"file": "tokenizer.json", "sha256": m["files"]["tokenizer"]["sha256"],
               "bytes": m["files"]["tokenizer"]["bytes"]}
        m["graphs"]["fp32"]["vision"]["external_data"] = [rec] * 100_000
    edit_manifest(bundle_copy, many)
    assert_refused(*cli(capsys, "inspect", bundle_copy, limit_s=15), match="files")


def test_each_file_is_hashed_once(bundle_copy, monkeypatch):
    seen = []
    real = BundleFiles._hash_file

    def spy(self, name, *a):
        seen.append(name)
        return real(self, name, *a)

    monkeypatch.setattr(BundleFiles, "_hash_file", spy)
    BundleFiles(bundle_copy).verify_all([("vision.onnx", sha256_file(bundle_copy / "vision.onnx"), None)] * 1000)
    assert seen == ["vision.onnx"]


def test_huge_tokenizer_is_refused_before_reading(bundle_copy, capsys):
    with open(bundle_copy / "tokenizer.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB, over the 64 MiB cap
    rehash(bundle_copy)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG), match="limit")


def _png_header_only(width: int, height: int, bit_depth: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_16_bit_giant_png_is_refused_from_its_header(tiny_bundle, tmp_path, capsys):
    p = tmp_path / "big16.png"
    p.write_bytes(_png_header_only(16384, 16384, 16))
    assert_refused(*cli(capsys, "run", tiny_bundle, "-i", p, limit_s=10), match="too large")


def test_text_features_that_unpack_to_too_much_are_refused(tmp_path, monkeypatch):
    from runtime import retrieval

    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, feats=np.zeros((4096, 512), np.float32), ids=np.zeros((4096, 2), np.int64),
                        texts=np.array(["a"] * 4096), meta=np.array("{}"))
    assert p.stat().st_size < 200_000
    monkeypatch.setattr(retrieval, "MAX_TEXT_FEATURES_BYTES", 1 << 20)  # the 1 GiB cap, scaled down
    with pytest.raises(InputError, match="over the"):
        retrieval.TextSet.load(p)


def test_text_features_with_wrong_meta_type_are_one_line(tmp_path):
    from runtime.retrieval import TextSet

    p = tmp_path / "list-meta.npz"
    np.savez(p, feats=np.zeros((1, 4), np.float32), ids=np.zeros((1, 2), np.int64), texts=np.array(["a"]),
             meta=np.array("[1, 2]"))
    with pytest.raises(InputError, match="wrong field types"):
        TextSet.load(p)


def test_a_graph_that_never_ends_hits_the_deadline(bundle_copy, capsys):
    """A decoder that never emits EOS with a huge context: the request stops at its deadline."""
    rt = Blip2Runtime(bundle_copy, timeout=1.0)
    dec = rt.graph(GraphName.DECODER)
    real_run = dec.binding

    class Slow:  # each decode step takes 50 ms: 16k steps would take 15 minutes
        def __init__(self, b):
            self.b = b

        def __getattr__(self, k):
            return getattr(self.b, k)

        def run(self):
            time.sleep(0.05)
            return self.b.run()

    dec.binding = lambda: Slow(real_run())
    t0 = time.monotonic()
    with pytest.raises(LimitError, match="deadline"):
        rt.generate([IMG], [""], max_new_tokens=100, min_new_tokens=100)
    assert time.monotonic() - t0 < 3


def test_deadline_terminates_a_running_ort_graph():
    """RunOptions.terminate from the deadline's timer stops one long session.run (a graph that computes for
    minutes), not only the loop between runs."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.backends.ort import OrtGraph
    from runtime.contract import GraphIO, TensorSpec
    from runtime.deadline import deadline
    from runtime.manifest import GraphRecord

    n = 1024
    nodes = [helper.make_node("MatMul", [f"x{i}", "x0"], [f"x{i + 1}"]) for i in range(400)]
    nodes.append(helper.make_node("Identity", ["x400"], ["y"]))
    g = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])])
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ORT 1.18+ reads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rec = GraphRecord("vision", "slow.onnx", "0" * 64, GraphIO((TensorSpec("x0", "float32", (n, n)),),
                                                                (TensorSpec("y", "float32", (n, n)),)))
    graph = OrtGraph(sess, rec)
    x = np.full((n, n), 1e-3, np.float32)
    t0 = time.monotonic()
    with pytest.raises(LimitError, match="deadline"), deadline(0.3):
        graph.run({"x0": x})
    assert time.monotonic() - t0 < 5, "the run was not terminated"
    assert onnx


# --------------------------------------------------------------------------------- 6. one-line errors
def test_embedding_table_shorter_than_the_vocab(bundle_copy, capsys):
    np.save(bundle_copy / "embed_tokens.npy", np.zeros((10, 32), np.float32))
    rehash(bundle_copy)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG), match="rows")


def test_tokenizer_ids_beyond_the_table():
    from runtime.text import TextTokenizer

    tk = TextTokenizer(Path(IMG).parents[1] / "demo_model" / "tokenizer.json", vocab_limit=3)
    with pytest.raises(BundleError, match="outside the model's embedding table"):
        tk.encode("a red circle")


def test_ort_run_errors_are_one_line(tiny_bundle):
    rt = Blip2Runtime(tiny_bundle)
    with pytest.raises(Blip2Error, match="ONNX Runtime failed") as e:
        rt.graph(GraphName.VISION).run({"pixel_values": np.zeros((1, 3, 7, 5), np.float32)})
    assert "\n" not in str(e.value)


def test_giant_integer_in_the_manifest(bundle_copy, capsys):
    text = (bundle_copy / MANIFEST_NAME).read_text().replace('"max_context": 128', '"max_context": ' + "9" * 5000)
    (bundle_copy / MANIFEST_NAME).write_text(text)
    assert_refused(*cli(capsys, "inspect", bundle_copy), match="not a manifest")


def test_num_query_tokens_must_match_the_graph(bundle_copy, capsys):
    def edit(m):
        m["model"]["num_query_tokens"] = 9
        for t in m["graphs"]["fp32"]["qformer"]["io"]["outputs"]:
            t["dims"][1] = 9
    edit_manifest(bundle_copy, edit)
    assert_refused(*cli(capsys, "run", bundle_copy, "-i", IMG), match="9")


# ------------------------------------------------------------------------------------ 7. terminal escapes
def test_escapes_from_the_tokenizer_and_file_names_are_not_printed(bundle_copy, tmp_path, capsys):
    tok = json.loads((bundle_copy / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {(k if v < 6 else f"\x1b]0;{k}\x07\x9b31m"): v for k, v in tok["model"]["vocab"].items()}
    (bundle_copy / "tokenizer.json").write_text(json.dumps(tok))
    rehash(bundle_copy)
    img = tmp_path / "a\x1b[2Jb.png"
    shutil.copy(IMG, img)
    rc, out, err = cli(capsys, "run", bundle_copy, "-i", img, "-i", IMG, "--max-new-tokens", "4")
    assert rc == 0, err
    assert "\ufffd]0;" in out  # the tokens were there, defused
    for ch in ("\x1b", "\x07", "\x9b"):
        assert ch not in out + err
    rc, out, err = cli(capsys, "run", bundle_copy, "-i", img, "--stream", "--max-new-tokens", "4")
    assert rc == 0 and "\x1b" not in out + err


def test_printable_and_plain_names():
    assert printable("a\x1b]0;x\x07b\x9bc\td") == "a\ufffd]0;x\ufffdb\ufffdc\ufffdd"
    for bad in ["../x", "/etc/passwd", "a/b", "a\\b", "C:x", "..", ".", "", "x\x00y", "manifest.json", 5]:
        with pytest.raises(BundleError):
            check_name(bad)
    assert check_name("vision.fp16.onnx.data") == "vision.fp16.onnx.data"


# --------------------------------------------------------------------------------- 8. --no-verify paths
def test_inspect_no_verify_does_not_stat_outside(bundle_copy, secret, capsys):
    edit_manifest(bundle_copy, lambda m: m["graphs"]["fp32"]["vision"].update(file=str(secret)))
    rc, out, err = cli(capsys, "inspect", bundle_copy, "--no-verify")
    assert_refused(rc, out, err, match="not a plain file name")
    assert str(secret.stat().st_size) not in out


def test_runtime_without_verify_reads_no_tokenizer_outside(bundle_copy, tmp_path):
    outside = tmp_path / "tok.json"
    shutil.copy(bundle_copy / "tokenizer.json", outside)
    edit_manifest(bundle_copy, lambda m: m["files"]["tokenizer"].update(file="../tok.json"))
    with pytest.raises(BundleError, match="plain file name"):
        Blip2Runtime(bundle_copy, verify=False)
