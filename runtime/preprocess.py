"""Image loading and preprocessing, identical to the checkpoint's BLIP image processor.

What transformers' ``BlipImageProcessor`` (PIL backend, what it runs without torchvision) does, step
for step, with the switches and values its config gave the exporter (manifest ``preprocess``):

1. convert_rgb: an image with an alpha band or a ``transparency`` entry (RGBA, LA, PA, P or RGB with
   tRNS) is alpha-composited onto white, then made RGB; every other mode goes through PIL's
   ``convert("RGB")``, which clips 16-bit and 32-bit grey (``I;16``, ``I``, ``F``) at 255 and
   converts CMYK and YCbCr as PIL does.
2. resize with PIL to (height, width) and the processor's resample filter, on the 8-bit image.
3. rescale: float64 times ``rescale_factor``, then float32.
4. normalize: ``(x - mean) / std`` in float32.

``load_image`` applies the EXIF orientation (as ``transformers.image_utils.load_image`` does), so a
photo taken sideways reaches the model upright; the processor itself never reads EXIF.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np

from runtime.errors import InputError
from runtime.manifest import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_files(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (by suffix), sorted by name; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"images folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images (jpg, png, ...) in {folder}")
    return files

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]  # noqa: F821

# Refuse absurd images before decoding them (decompression bombs): 16k x 16k pixels.
MAX_PIXELS = 16384 * 16384
MAX_WIDE_PIXELS = MAX_PIXELS // 4  # 16- and 32-bit images (modes I;16, I, F)

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def load_image(src: ImageLike):
    """Open ``src`` (path, bytes, HxWxC uint8 array or PIL image) as an RGB-ready PIL image.

    EXIF orientation is applied. Raises ``InputError`` naming the problem for a missing, empty,
    truncated or non-image file, an image over :data:`MAX_PIXELS` (checked from the header, before
    any pixel is decoded) or an argument of another type.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, memoryview):
        src = src.tobytes()
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, Image.Image)):
        raise InputError(f"an image must be a file path, bytes, a numpy array or a PIL image; "
                         f"got {type(src).__name__}")
    if isinstance(src, Image.Image):
        name = "image"
    else:
        name = "image bytes" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            if not str(src):
                raise InputError("image path is empty")
            p = Path(src)
            if not p.exists():
                raise InputError(f"image not found: {p}")
            if p.is_dir():
                raise InputError(f"{p} is a folder, not an image file")
            if p.stat().st_size == 0:
                raise InputError(f"image file is empty: {p}")
            img = Image.open(p)
        if img.width < 1 or img.height < 1:
            raise InputError(f"{name} has no pixels")
        if img.width * img.height > MAX_PIXELS:  # from the header: refuse before decoding (memory)
            raise InputError(f"{name} of {img.width}x{img.height} is too large (over {MAX_PIXELS} pixels)")
        if img.mode.startswith(("I", "F")) and img.width * img.height > MAX_WIDE_PIXELS:
            # 16- and 32-bit pixels are scaled through 32-bit copies: a quarter of the pixels, same memory
            raise InputError(f"{name} of {img.width}x{img.height} {img.mode} pixels is too large (over "
                             f"{MAX_WIDE_PIXELS} pixels of 16 or 32 bits)")
        img.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image PIL can read (JPEG, PNG, ...)") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name} is too large (over {MAX_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name} is corrupt or truncated: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block should not reject a decodable image
        pass
    return img


def _from_array(arr: np.ndarray):
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InputError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {tuple(arr.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError("image array has no pixels")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise InputError(f"image array of {a.shape[1]}x{a.shape[0]} is too large (over {MAX_PIXELS} pixels)")
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise InputError("image array contains NaN or Inf")
            a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).round().astype(np.uint8)
        elif a.dtype == np.uint16:  # 16-bit camera data: scaled like a 16-bit PNG, not clipped
            a = (a.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
        elif np.issubdtype(a.dtype, np.integer):
            a = np.clip(a, 0, 255).astype(np.uint8)
        else:
            raise InputError(f"image array must hold integers or floats, not {a.dtype}")
    if a.shape[2] == 1:
        return Image.fromarray(a[:, :, 0], mode="L")
    return Image.fromarray(a, mode="RGB" if a.shape[2] == 3 else "RGBA")


def to_rgb(img):
    """8-bit RGB exactly as transformers' ``convert_to_rgb`` makes it (see the module docstring)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(images: list, cfg: Preprocess) -> np.ndarray:
    """Images (anything :func:`load_image` takes) -> pixel_values float32 [B, 3, H, W]."""
    out = np.empty((len(images), 3, cfg.height, cfg.width), dtype=np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    for i, src in enumerate(images):
        img = load_image(src)
        try:
            if cfg.convert_rgb:
                img = to_rgb(img)
            elif img.mode != "RGB":
                raise InputError(f"image {i} is {img.mode}, and this checkpoint's processor does not convert "
                                 "images to RGB (do_convert_rgb is false): give RGB images")
            if cfg.do_resize:
                img = img.resize((cfg.width, cfg.height), resample=_RESAMPLE.get(cfg.resample, 3))
            elif img.size != (cfg.width, cfg.height):
                raise InputError(f"image {i} is {img.width}x{img.height}; this checkpoint's processor does not "
                                 f"resize (do_resize is false), so it must be {cfg.width}x{cfg.height}")
        except (OSError, ValueError) as e:  # a mode PIL cannot convert, a frame that fails to decode late
            raise InputError(f"image {i} ({img.mode} {img.width}x{img.height}) cannot be used: {e}") from None
        chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        x = (chw.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale \
            else chw.astype(np.float32)
        if cfg.do_normalize:  # transformers: ((x.T - mean) / std).T in float32
            x = ((x.T - mean) / std).T
        out[i] = x
    return out
