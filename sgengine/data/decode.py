"""One image -> one uint8 (size, size, C) row: decode, refuse what cannot be represented, ADM crop.

Everything that turns an image file into training pixels goes through ``decode_image``: the
pack workers, the legacy folder loader and the sampler's exemplar. Rules:

- JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4, 1/8 while both sides stay >= size):
  3-4x faster on large photos, and ADM's own pipeline box-halves them anyway.
- The ADM centre crop (Dhariwal & Nichol's ``center_crop_arr``): halve with a box filter while the
  short side is >= 2 size, bicubic-resize the short side to ``size``, crop the centre.
- 16-bit images (PNG 'I;16', 'I') are scaled by 255/65535, never clipped; float images are refused.
- Degenerate images (short side < MIN_SIDE or aspect > MAX_ASPECT, e.g. 1x500) are refused: their
  centre crop would be one stretched row of colour.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MIN_SIDE = 8
MAX_ASPECT = 8.0
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class Unusable(ValueError):
    """An image that is readable but cannot be represented (listed as skipped, with this reason)."""


def open_image(src) -> Image.Image:
    """A path, bytes, or an open binary file -> a PIL image (lazy: pixels are not decoded yet)."""
    return Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """'L' (channels=1) or 'RGB', scaling 16-bit pixels to 8 bits instead of saturating them."""
    if im.mode in SIXTEEN_BIT:
        arr = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise Unusable("floating-point image (mode F): save it as 8- or 16-bit PNG")
    return im.convert("L" if channels == 1 else "RGB")


def adm_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while short side >= 2 size, bicubic to short side = size, crop."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    arr = np.array(im)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def check_shape(w: int, h: int) -> None:
    if min(w, h) < MIN_SIDE or max(w, h) / min(w, h) > MAX_ASPECT:
        raise Unusable(f"degenerate {w}x{h} image: short side < {MIN_SIDE} px or aspect > {MAX_ASPECT:g}; "
                       "its centre crop would be one stretched row")


def decode_image(src, size: int, channels: int = 3) -> np.ndarray:
    """A path or encoded bytes -> uint8 (size, size, channels) (see the module doc)."""
    with open_image(src) as im:
        check_shape(*im.size)
        if im.format == "JPEG":
            im.draft("L" if channels == 1 else "RGB", (size, size))
        arr = adm_center_crop(to_mode(im, channels), size)
    return arr[..., None] if arr.ndim == 2 else arr


def resize_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, C) -> (n, size, size, C) through the same ADM crop (arrays, e.g. ImageNet64 -> 32)."""
    out = np.empty((len(rows), size, size, rows.shape[-1]), np.uint8)
    for i, row in enumerate(rows):
        im = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
        arr = adm_center_crop(im, size)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out
