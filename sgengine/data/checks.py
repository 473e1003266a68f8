"""Rules for arrays of images: what is accepted, what is scaled, what is refused (one-line errors).

- uint8: as it is. uint16: scaled by 255/65535 (16-bit images), never clipped. Other integer
  types: accepted only within [0, 255]. bool / complex / object: refused.
- float: kept as it is (latents, or images in [-1, 1]): no clipping, no quantisation; NaN / Inf
  are refused, naming their count and the first index.
- empty arrays are refused; images must be square and of the model's size, unless the caller
  passes ``resize=True`` (the ``--data_resize`` flag), which resizes with an antialiased filter.
Every error names the file and the fix.
"""
from __future__ import annotations

import numpy as np

CHUNK_ROWS = 4096  # rows per pass of the scans below: bounded memory on memory-mapped arrays


def to_nhwc(arr: np.ndarray, file) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, H, W, C) (a view when possible)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"{file}: image array must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {arr.shape}")
    if arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if len(arr) == 0:
        raise ValueError(f"{file} holds no images (shape {arr.shape}): pass a non-empty array")
    return arr


def check_finite(arr: np.ndarray, file) -> None:
    """Refuse NaN / Inf, naming how many and where the first one is."""
    if arr.dtype.kind != "f":
        return
    bad, first = 0, None
    for start in range(0, len(arr), CHUNK_ROWS):
        part = ~np.isfinite(arr[start:start + CHUNK_ROWS])
        n = int(part.sum())
        if n and first is None:
            first = tuple(int(i) for i in np.argwhere(part)[0])
            first = (first[0] + start, *first[1:])
        bad += n
    if bad:
        raise ValueError(f"{file} holds {bad} NaN/Inf value(s), the first at index {first}: "
                         "fix or drop those images (np.isfinite) and save the array again")


def scale_integers(arr: np.ndarray, file) -> np.ndarray:
    """Integer images -> uint8: uint16 scaled by 255/65535; others must lie in [0, 255]."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{file}: {arr.dtype} values in [{lo}, {hi}] are not 8-bit pixels: "
                             "save uint8 in [0, 255], uint16 (16-bit), or floats")
        return arr.astype(np.uint8)
    raise ValueError(f"{file}: {arr.dtype} arrays cannot be images: save uint8, uint16 or float32")


def as_uint8_nhwc(arr: np.ndarray, file) -> np.ndarray:
    """What a pack stores: uint8 (N, H, W, C). Floats are refused (train on them directly)."""
    arr = to_nhwc(arr, file)
    if arr.dtype.kind == "f":
        raise ValueError(f"{file}: float arrays are not packed to uint8 (that would quantise them); "
                         "pass the array itself as --data: floats train as they are")
    return scale_integers(arr, file)


def check_geometry(h: int, w: int, size: int | None, file, resize: bool) -> bool:
    """True when the images must be resized to ``size``; refuses non-square or wrongly sized ones."""
    if size is None or (h == w == size):
        return False
    if resize:
        return True
    what = "non-square" if h != w else "sized"
    raise ValueError(f"{file}: {what} {h}x{w} images but the model takes {size}x{size}: pack the source at "
                     f"{size} (python -m sgengine.data pack SRC OUT --size {size}), set the model's img_size, "
                     "or pass --data_resize true to resize")


def channel_stats(arr: np.ndarray) -> dict:
    """dtype, per-channel mean and std of an (N, H, W, C) array, in chunks (float64 sums)."""
    c = arr.shape[-1]
    s, sq, n = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(arr), CHUNK_ROWS):
        part = np.asarray(arr[start:start + CHUNK_ROWS], dtype=np.float64).reshape(-1, c)
        s, sq, n = s + part.sum(0), sq + (part * part).sum(0), n + len(part)
    return stats_from_sums(s, sq, n, arr.dtype)


def stats_from_sums(s, sq, n: int, dtype) -> dict:
    mean = np.asarray(s) / max(n, 1)
    std = np.sqrt(np.maximum(np.asarray(sq) / max(n, 1) - mean ** 2, 0.0))
    return {"dtype": str(np.dtype(dtype)), "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(v), 6) for v in std]}
