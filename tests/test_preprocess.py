"""Image preprocessing equals the checkpoint's BlipImageProcessor, for files and arrays of any mode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.manifest import load_manifest
from runtime.preprocess import load_image, preprocess


@pytest.fixture(scope="module")
def pre(tiny_bundle):
    return load_manifest(tiny_bundle).preprocess


@pytest.mark.parametrize("mode,ext", [("RGB", "png"), ("RGB", "jpg"), ("L", "png"), ("RGBA", "png"),
                                      ("P", "png"), ("CMYK", "jpg")])
def test_matches_transformers_processor(tmp_path, pre, tiny_model, mode, ext):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"x.{ext}"
    img.save(path)
    ours = preprocess([path], pre)
    ref = tiny_model[2](images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, pre.height, pre.width)
    assert np.abs(ours - ref).max() < 1e-5


def test_array_input_equals_file_input(tmp_path, pre):
    a = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert np.array_equal(preprocess([a], pre), preprocess([tmp_path / "a.png"], pre))


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_sixteen_bit_png_as_the_processor_reads_it(tmp_path, pre, tiny_model):
    """A 16-bit grey PNG goes through PIL's convert("RGB") as in transformers' processor: it clips at 255."""
    a = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    out = preprocess([tmp_path / "d.png"], pre)
    ref = tiny_model[2](images=[load_image(tmp_path / "d.png")], return_tensors="np")["pixel_values"]
    assert np.abs(out - ref).max() < 1e-6
    assert np.isfinite(out).all()


@pytest.mark.parametrize("payload", [b"", b"GIF89a garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_broken_bytes_raise_input_error(payload):
    with pytest.raises(InputError):
        load_image(payload)


def test_bad_array_shape():
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
