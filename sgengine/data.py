"""Training data: an image folder, an .npz/.npy array, or the embedded digits.

Images are held in memory as uint8 (N, C, H, W) and turned into floats in [-1, 1]
on the training device, one batch at a time. Unreadable files in a folder are
skipped, counted and reported; they never stop a run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageData:
    """images: uint8 (N, C, H, W); labels: int64 (N,) or None; names: one per image."""
    images: torch.Tensor
    labels: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor, device) -> torch.Tensor:
        """Floats in [-1, 1] on ``device``; the uint8 transfer keeps the copy small."""
        x = self.images[idx.cpu()].to(device, non_blocking=True)
        return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 in [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_digits(size: int = 16) -> ImageData:
    """scikit-learn's handwritten digits (1,797 8x8 images, values 0..16), bilinear-upsampled."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(img, torch.from_numpy(d.target).long(), [f"digit_{i}" for i in range(len(img))])


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (C, size, size), centre-cropped and resized as for training."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        s = min(w, h)  # centre crop to a square, then resize (ADM's preprocessing)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC if s > size else Image.NEAREST)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_folder(root: str | os.PathLike, size: int, channels: int = 3, progress: bool = True) -> ImageData:
    """Every image under ``root`` (recursive). Labels come from the first-level folder names."""
    root = Path(root)
    paths = list_images(root)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    arrays, names, skipped = [], [], []
    for p in tqdm(paths, desc=f"reading {root.name}", disable=not progress):
        try:
            arrays.append(read_image(p, size, channels))
            names.append(str(p.relative_to(root)))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            skipped.append((str(p), f"{type(err).__name__}: {err}"))
    if not arrays:
        raise ValueError(f"none of the {len(paths)} images under {root} could be read; first error: {skipped[0][1]}")
    return ImageData(torch.from_numpy(np.stack(arrays)), _folder_labels(names), names, skipped)


def _folder_labels(names: list[str]) -> torch.Tensor | None:
    tops = [n.split(os.sep)[0] for n in names]
    if all(os.sep not in n for n in names):
        return None
    classes = {c: i for i, c in enumerate(sorted(set(tops)))}
    return torch.tensor([classes[c] for c in tops], dtype=torch.long)


def _to_nchw_uint8(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"image array must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {arr.shape}")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr + 1) * 127.5 if lo < 0 else arr * 255.0 if hi <= 1.0 else arr
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_array(path: str | os.PathLike, size: int | None = None) -> ImageData:
    """An .npy array or an .npz with images under 'x', 'images' or 'arr_0' (labels: 'y'/'labels')."""
    data = np.load(path)
    if isinstance(data, np.ndarray):
        arr, labels = data, None
    else:
        key = next((k for k in ("x", "images", "arr_0") if k in data), None)
        if key is None:
            raise KeyError(f"{path} holds {list(data.keys())}; put the images under 'x' or 'images'")
        arr = data[key]
        labels = next((data[k] for k in ("y", "labels") if k in data), None)
    img = _to_nchw_uint8(arr)
    if size and img.shape[-1] != size:
        img = to_uint8(F.interpolate(img.float() / 127.5 - 1, size=(size, size), mode="bilinear", antialias=True))
    lab = None if labels is None else torch.as_tensor(np.asarray(labels)).long().view(-1)
    return ImageData(img, lab, [f"{Path(path).name}[{i}]" for i in range(len(img))])


def load_data(spec: str, size: int, channels: int = 3, progress: bool = True) -> ImageData:
    """'digits', a folder, or an .npz/.npy file."""
    if spec == "digits":
        return load_digits(size)
    path = Path(spec)
    if path.is_dir():
        return load_folder(path, size, channels, progress)
    if path.suffix in (".npz", ".npy") and path.is_file():
        return load_array(path, size)
    raise FileNotFoundError(f"--data {spec!r} is neither 'digits', an image folder, nor an .npz/.npy file")


def report_skipped(data: ImageData, log=print) -> None:
    if data.skipped:
        log(f"skipped {len(data.skipped)} unreadable file(s); first: {data.skipped[0][0]} ({data.skipped[0][1]})")
