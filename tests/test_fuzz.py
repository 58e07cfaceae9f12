"""Reliability 1: fuzzed manifests, prompts and images either work or raise the project's own error.

Every case here ends in one of two ways: the call returns a usable result, or it raises a
:class:`~runtime.errors.Blip2Error` subclass (``BundleError``, ``InputError``, ``LimitError``) whose
message says what is wrong. Any other exception (KeyError, TypeError, an ONNX Runtime error, ...) or a
call that does not return within :data:`HANG_S` seconds fails the test.

Hypothesis runs derandomized (the same examples on every run) so CI is stable; to explore new examples
run ``pytest tests/test_fuzz.py --hypothesis-seed=N -p no:randomly`` with ``derandomize`` off in FUZZ.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import Blip2Error, BundleError, InputError, LimitError
from runtime.manifest import MANIFEST_NAME, load_manifest
from runtime.pipeline import Blip2Runtime
from runtime.preprocess import MAX_PIXELS, load_image, preprocess

HANG_S = 30.0
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
IMG = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def no_hang(fn, *args, timeout: float = HANG_S, **kw):
    """Run ``fn`` in a worker thread; fail the test if it has not returned after ``timeout`` seconds."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed back to the test thread below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def works_or_blip2(fn, *args, **kw):
    """The result of ``fn``, or the Blip2Error it raised (anything else propagates and fails the test)."""
    try:
        return no_hang(fn, *args, **kw)
    except Blip2Error as e:
        assert str(e).strip(), "a Blip2Error must say what is wrong"
        return e


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Blip2Runtime(tiny_bundle)


@pytest.fixture(scope="module")
def pre(tiny_bundle):
    return load_manifest(tiny_bundle).preprocess


# ------------------------------------------------------------------------------------------ manifests
def _paths(obj, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root excluded."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _mutate(doc, path, op, value=None):
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if op == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _other_type(v):
    """A JSON value of another type than ``v`` (what a hand-edited or corrupted manifest holds)."""
    if isinstance(v, bool):
        return "yes"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return 7
    if isinstance(v, list):
        return {"0": v[:1]}
    if isinstance(v, dict):
        return list(v)
    return "null"


@pytest.fixture(scope="module")
def manifest_lab(tiny_bundle, tmp_path_factory):
    """A private bundle copy whose manifest each case overwrites, and the original manifest JSON."""
    lab = tmp_path_factory.mktemp("manifest-lab") / "bundle"
    shutil.copytree(tiny_bundle, lab)
    return lab, json.loads((tiny_bundle / MANIFEST_NAME).read_text())


def _load_and_run(bundle) -> str:
    """'refused' (BundleError from the loader) or 'ran' (the runtime generated, or said why not)."""
    try:
        load_manifest(bundle)
    except BundleError as e:
        assert str(e).strip()
        return "refused"
    out = works_or_blip2(lambda: Blip2Runtime(bundle).generate([IMG], ["a photo of"], max_new_tokens=3))
    if not isinstance(out, Blip2Error):
        assert isinstance(out[0].text, str)
    return "ran"


# Keys a decoder-only bundle may lack: provenance, generation defaults (documented defaults), build notes
# (an engine whose notes are incomplete is refused or not used), facts of other families, optional ranges.
OPTIONAL_KEYS = ("source*", "versions*", "generation*", "graphs/*/*/notes*", "graphs/*/*/precision",
                 "graphs/*/*/external_data", "graphs/*/*/engines", "graphs/*/*/engines/*/profile*",
                 "graphs/*/*/transform",  # manifests written before it: read from the notes
                 "model/decoder_start_token_id",
                 "model/embed_dim", "model/image_token_id", "dims/seq", "dims/past", "dims/total",
                 "files/tokenizer_config", "preprocess/do_*")


def test_every_key_dropped_or_retyped_is_refused_or_harmless(manifest_lab):
    """Each of the manifest's ~250 keys, dropped or given a value of the wrong JSON type. A dropped key that
    is not refused must be one of OPTIONAL_KEYS: a required fact never quietly takes a default (dropping
    preprocess.mean would otherwise normalise with CLIP's constants)."""
    import fnmatch

    lab, doc = manifest_lab
    outcomes = {"refused": 0, "ran": 0}
    defaulted = []
    for path in _paths(doc):
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        for op, value in (("drop", None), ("set", _other_type(parent[path[-1]]))):
            (lab / MANIFEST_NAME).write_text(json.dumps(_mutate(doc, path, op, value)))
            try:
                outcome = _load_and_run(lab)
            except Exception as e:  # name the case that crashed
                raise AssertionError(f"{op} {'/'.join(map(str, path))} -> {type(e).__name__}: {e}") from e
            outcomes[outcome] += 1
            key = "/".join(map(str, path))
            if op == "drop" and outcome == "ran" and not any(fnmatch.fnmatch(key, p) for p in OPTIONAL_KEYS):
                defaulted.append(key)
    assert defaulted == []
    assert outcomes["refused"] > 300 and outcomes["ran"] > 10, outcomes


_json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["../outside.onnx", "/etc/passwd", "decoder.onnx", "fp16", "shared_buffer"]),
    st.lists(st.integers(-3, 70), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@FUZZ
@given(data=st.data())
def test_random_manifest_mutations(manifest_lab, data):
    """Up to three mutations at once: drop a key, set a random value, or nudge a number in range."""
    lab, doc = manifest_lab
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        op = data.draw(st.sampled_from(["drop", "set", "nudge"]), label="op")
        if op == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            doc = _mutate(doc, path, "set", old + data.draw(st.sampled_from([-old - 1, -1, 1, 1000, 10**9])))
        elif op == "drop":
            doc = _mutate(doc, path, "drop")
        else:
            doc = _mutate(doc, path, "set", data.draw(_json_values, label="value"))
    (lab / MANIFEST_NAME).write_text(json.dumps(doc))
    _load_and_run(lab)


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b'"text"', b"42", b"\xef\xbb\xbf{}", b"{\"format_version\": 1}",
                     b"[" * 100_000, b"{\"a\":" * 50_000, "{\"format_version\": 1, \"model\": \"\u00e9\"}".encode("latin-1")]),
))
def test_manifest_bytes_that_are_not_a_manifest(manifest_lab, raw):
    lab, _ = manifest_lab
    (lab / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(BundleError):
        no_hang(load_manifest, lab)


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_manifest(manifest_lab, cut):
    lab, doc = manifest_lab
    text = json.dumps(doc, indent=2)
    (lab / MANIFEST_NAME).write_text(text[: int(len(text) * cut)])
    with pytest.raises(BundleError, match="not valid JSON|must hold a JSON object"):
        no_hang(load_manifest, lab)


# -------------------------------------------------------------------------------------------- prompts
_nasty = st.sampled_from(["\x00", "\x01", "\x1b[31m", "\x7f", "\u200b", "\u202e", "\ufeff", "\ud800", "\udcff",
                          "\U0001f600", "\u0301", "\n", "\t", "\r\n", "</s>", "<pad>", "<unk>", "\uffff", "\U0010ffff"])
_prompt = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=60),
    st.lists(st.one_of(_nasty, st.text(max_size=5)), max_size=12).map("".join),
)


@FUZZ
@given(prompt=_prompt)
def test_any_prompt_works_or_is_refused_clearly(rt, prompt):
    out = works_or_blip2(rt.generate, [IMG], [prompt], max_new_tokens=2)
    if isinstance(out, Blip2Error):
        assert isinstance(out, (InputError, LimitError)), out
        if isinstance(out, InputError):  # only text that is not valid Unicode is refused
            with pytest.raises(UnicodeEncodeError):
                prompt.encode("utf-8")
        return
    (g,) = out
    assert isinstance(g.text, str) and 1 <= len(g.token_ids) <= 2
    assert all(0 <= t < rt.manifest.model.vocab_size for t in g.token_ids)


@FUZZ
@given(prompts=st.lists(_prompt, min_size=2, max_size=4))
def test_batch_of_odd_prompts(rt, prompts):
    out = works_or_blip2(rt.generate, [IMG] * len(prompts), prompts, max_new_tokens=2)
    if not isinstance(out, Blip2Error):
        assert len(out) == len(prompts)


@pytest.mark.parametrize("prompt", ["", " ", "\x00" * 10, "word " * 30, "word " * 5_000, "x" * 200_000,
                                    "\U0001f600" * 10_000],
                         ids=["empty", "space", "nuls", "30-words", "5k-words", "200k-chars", "10k-emoji"])
def test_empty_and_very_long_prompts(rt, prompt):
    """Prompts over the context end in LimitError naming --max-context (the tiny bundle has 128 positions);
    the rest work, however odd (200k characters of one unknown word are one token)."""
    m = rt.manifest.model
    need = m.num_query_tokens + len(rt.tokenizer.encode(prompt)) + 2
    out = works_or_blip2(rt.generate, [IMG], [prompt], max_new_tokens=2)
    if need > m.max_context:
        assert isinstance(out, LimitError) and "--max-context" in str(out), out
    else:
        assert not isinstance(out, Blip2Error), out


@pytest.mark.parametrize("prompt", [None, b"bytes", 7, ["list"], {"a": 1}])
def test_prompt_of_wrong_type(rt, prompt):
    with pytest.raises(InputError, match="prompt must be a string"):
        rt.generate([IMG], [prompt], max_new_tokens=2)


# --------------------------------------------------------------------------------------------- images
def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


MODES = ["RGB", "L", "LA", "RGBA", "P", "PA", "CMYK", "1", "I", "I;16", "F", "YCbCr", "HSV", "LAB", "RGBX"]
FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "WEBP": "webp", "PPM": "ppm"}


def _make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.standard_normal((h, w)).astype(np.float32) * 300)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _check_pixels(out: np.ndarray, pre, n: int = 1) -> None:
    assert out.shape == (n, 3, pre.height, pre.width) and out.dtype == np.float32
    assert np.isfinite(out).all()


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)), ext=st.sampled_from(
    [None, "jpg", "png", "txt", ""]), w=st.integers(1, 48), h=st.integers(1, 48), seed=st.integers(0, 99),
    cut=st.one_of(st.none(), st.floats(0.0, 0.99)))
def test_any_image_file_works_or_is_refused_clearly(tmp_path, pre, mode, fmt, ext, w, h, seed, cut):
    """Random mode x format x size, saved under a right or wrong extension, maybe truncated."""
    img = _make_image(mode, w, h, seed)
    try:
        data = _encoded(img, fmt)
    except (OSError, ValueError, KeyError):  # PIL cannot write this mode in this format: nothing to test
        return
    if cut is not None:
        data = data[: int(len(data) * cut)]
    path = tmp_path / f"frame.{FORMATS[fmt] if ext is None else ext}"
    path.write_bytes(data)
    for src in (path, data):
        out = works_or_blip2(preprocess, [src], pre)
        if isinstance(out, Blip2Error):
            assert isinstance(out, InputError), out
            assert cut is not None or len(data) == 0, f"an intact {mode} {fmt} was refused: {out}"
        else:
            _check_pixels(out, pre)


@FUZZ
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                                                             b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]))
def test_random_bytes_with_image_magic(pre, data, prefix):
    out = works_or_blip2(preprocess, [prefix + data], pre)
    if isinstance(out, Blip2Error):
        assert isinstance(out, InputError)
    else:
        _check_pixels(out, pre)


@FUZZ
@given(dtype=st.sampled_from(["uint8", "bool", "int8", "uint16", "int32", "int64", "float16", "float32", "float64",
                              "complex64", "object", "<U2", "datetime64[s]"]),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=5).map(tuple), seed=st.integers(0, 9),
       special=st.sampled_from([None, "nan", "inf", "neg", "huge"]))
def test_any_array_works_or_is_refused_clearly(pre, dtype, shape, seed, special):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * 200)
    if special == "nan" and a.size:
        a.flat[0] = np.nan
    elif special == "inf" and a.size:
        a.flat[0] = np.inf
    elif special == "neg":
        a = -np.abs(a)
    elif special == "huge":
        a = a * 1e30
    try:
        with np.errstate(all="ignore"):
            arr = a.astype(dtype)
    except (ValueError, TypeError, OverflowError):
        arr = np.full(shape, "x", dtype=object) if dtype == "object" else np.zeros(shape, dtype=dtype)
    out = works_or_blip2(preprocess, [arr], pre)
    if isinstance(out, Blip2Error):
        assert isinstance(out, InputError)
    else:
        _check_pixels(out, pre)


@pytest.mark.parametrize("src", [None, 1, 2.5, ["a.png"], {"path": "a.png"}, object(), "", b""])
def test_non_image_arguments(pre, src):
    with pytest.raises(InputError):
        preprocess([src], pre)


def test_memoryview_and_bytearray_of_a_png(pre):
    data = _encoded(Image.fromarray(IMG), "PNG")
    ref = preprocess([data], pre)
    assert np.array_equal(preprocess([memoryview(data)], pre), ref)
    assert np.array_equal(preprocess([bytearray(data)], pre), ref)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("w,h", [(20_000, 20_000), (65_535, 65_535), (1, 300_000_000)])
def test_huge_dimensions_are_refused_from_the_header(tmp_path, w, h):
    """A 100-byte file claiming 400 M pixels is refused before any pixel is decoded (no 400 MB allocation):
    the message is "too large", not the "corrupt" a decode of the missing pixel data would give."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(w, h))
    with pytest.raises(InputError, match="too large"):
        no_hang(load_image, path, timeout=10)


def test_huge_array_is_refused():
    big = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20_000, 20_000, 3))  # a view: no memory used
    with pytest.raises(InputError, match="too large"):
        load_image(big)
    assert 20_000 * 20_000 > MAX_PIXELS


def test_one_by_one_and_extreme_aspect(pre):
    for shape in [(1, 1, 3), (1, 2000, 3), (2000, 1), (1, 1)]:
        _check_pixels(preprocess([np.full(shape, 200, np.uint8)], pre), pre)


def test_sixteen_bit_file_reads_as_the_processor_and_array_is_scaled(tmp_path, pre):
    """A 16-bit PNG goes through PIL's convert("RGB") as in transformers' processor (clipped at 255: the
    eager reference's pixels); a uint16 numpy array, which transformers refuses, is scaled to 8 bits."""
    a = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    from_file = preprocess([tmp_path / "d.png"], pre)
    clipped = preprocess([np.clip(a, 0, 255).astype(np.uint8)], pre)
    assert np.abs(from_file - clipped).max() < 1e-6
    from_array = preprocess([a], pre)
    scaled = preprocess([(a.astype(np.float64) * 255 / 65535).round().astype(np.uint8)], pre)
    assert np.abs(from_array - scaled).max() < 1e-6
    assert from_array.max() - from_array.min() > 3.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(tmp_path, pre, orientation):
    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.jpg", exif=exif)
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.size == ((40, 20) if orientation <= 4 else (20, 40))
    _check_pixels(preprocess([tmp_path / "r.jpg"], pre), pre)


def test_broken_exif_block_does_not_reject_a_good_jpeg(tmp_path, pre):
    data = _encoded(Image.fromarray(IMG), "JPEG")
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40  # IFD with garbage entries
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    _check_pixels(preprocess([data], pre), pre)


def test_lazily_opened_truncated_pil_image(tmp_path, pre):
    """A PIL image the caller opened (not yet decoded) whose file is truncated: InputError, not OSError."""
    data = _encoded(Image.fromarray(IMG), "PNG")
    img = Image.open(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(InputError, match="corrupt or truncated"):
        preprocess([img], pre)


def test_animated_gif_uses_the_first_frame(pre):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess([buf.getvalue()], pre)
    assert np.allclose(out, preprocess([np.zeros((16, 16, 3), np.uint8)], pre), atol=1e-5)


def test_odd_images_through_the_whole_runtime(rt, tmp_path):
    """A mixed batch of valid odd images generates; one bad image in a batch refuses the whole call."""
    odd = [np.zeros((1, 1), np.uint8), _encoded(_make_image("CMYK", 9, 7, 0), "JPEG"),
           _encoded(_make_image("I;16", 5, 30, 1), "PNG"), _encoded(_make_image("LA", 8, 8, 2), "PNG")]
    out = rt.generate(odd, "a photo of", max_new_tokens=2)
    assert len(out) == 4
    with pytest.raises(InputError):
        rt.generate(odd + [b"\x89PNG\r\n\x1a\n"], "a photo of", max_new_tokens=2)
