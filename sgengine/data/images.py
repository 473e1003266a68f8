"""Training data in memory or memory-mapped: ImageData, and the loaders behind ``--data``.

``--data`` is 'digits', a pack folder (``python -m sgengine.data pack``; memory-mapped, see
packed.py), an image folder (decoded serially here: pack large ones), or an .npz/.npy array.
Images are uint8 (N, C, H, W) and become floats in [-1, 1] on the training device one batch at
a time; float arrays (latents) are kept as they are, with their dtype and per-channel statistics
recorded (checks.py holds the array rules). A posterior latent pack (mean and std of q(z|x))
gives a fresh draw z = mean + std * eps per batch (``ImageData.floats``). Unreadable files in a
folder are skipped, counted and reported; they never stop a run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import channel_stats, check_finite, check_geometry, scale_integers, to_nhwc
from .decode import decode_image
from .sources import IMAGE_SUFFIXES, READ_ERRORS, folder_labels, list_images, np_load

__all__ = ["ImageData", "IMAGE_SUFFIXES", "list_images", "load_array", "load_data", "load_digits", "load_folder",
           "posterior_draw", "read_image", "report_skipped", "to_float", "to_uint8"]


@dataclass
class ImageData:
    """images: uint8 (N, C, H, W) in [0, 255], or floats used as they are (N, C, H, W); labels: int64
    (N,) or None; names: one per image (may be empty); manifest: the pack's, when memory-mapped."""
    images: torch.Tensor
    labels: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict | None = None
    stats: dict | None = None  # dtype and per-channel mean / std of float data (of the latent trained on)
    # A posterior latent pack: (N, 2C, H, W), C mean then C std channels of q(z|x) (the stored rows);
    # ``images`` is then a view of the mean, the deterministic latent (features, self-labels).
    moments: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def stored(self) -> torch.Tensor:
        """What batches are gathered from: the moments of a posterior pack, else the images."""
        return self.images if self.moments is None else self.moments

    def floats(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gathered rows of ``stored()`` -> floats: uint8 scaled to [-1, 1], float data as it is;
        moments become a draw of q(z|x) with ``generator`` (on x's device), their mean without one."""
        if self.moments is None:
            return to_float(x)
        c = self.images.shape[1]
        return to_float(x[:, :c]) if generator is None else posterior_draw(x, generator)

    def batch(self, idx: torch.Tensor, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Floats on ``device``; uint8 travels as uint8 (4x smaller) and is scaled there."""
        return self.floats(self.stored()[idx.cpu()].to(device, non_blocking=True), generator)

    def to(self, device) -> ImageData:
        """The same data with its rows on ``device`` (one copy; images stays a view of the moments)."""
        if self.moments is None:
            return dataclasses.replace(self, images=self.images.to(device))
        moments = self.moments.to(device)
        return dataclasses.replace(self, images=moments[:, :self.images.shape[1]], moments=moments)


def posterior_draw(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) from ``generator``, of moments (B, 2C, H, W): a sample
    of q(z|x) per element, as U-ViT, LDM and EDM2 train on (float32, on the moments' device)."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    return torch.addcmul(mean, std, eps)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> floats in [-1, 1]; float data (latents) unchanged but for the dtype (float32)."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()


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
    """One image file -> uint8 (C, size, size), decoded as by the pack (decode.py)."""
    return decode_image(path, size, channels).transpose(2, 0, 1)


def load_folder(root: str | os.PathLike, size: int, channels: int = 3, progress: bool = True) -> ImageData:
    """Every image under ``root`` (recursive), decoded serially. Labels: the first-level folder names."""
    root = Path(root)
    paths = list_images(root)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    arrays, names, skipped = [], [], []
    for p in tqdm(paths, desc=f"reading {root.name}", disable=not progress):
        try:
            arrays.append(read_image(p, size, channels))
            names.append(str(p.relative_to(root)))
        except READ_ERRORS as err:
            skipped.append((str(p), f"{type(err).__name__}: {err}"))
    if not arrays:
        raise ValueError(f"none of the {len(paths)} images under {root} could be read; first error: {skipped[0][1]}")
    labels, _ = folder_labels(names)
    lab = None if labels is None else torch.from_numpy(labels)
    return ImageData(torch.from_numpy(np.stack(arrays)), lab, names, skipped)


def _read_array(path: Path):
    """(images, labels) of an .npy (memory-mapped) or .npz (images under 'x', 'images', 'arr_0' or the
    official 'data' rows; labels under 'y' / 'labels', 1-based in the official batches)."""
    data = np_load(path)
    if path.suffix == ".npy":
        return data, None
    if "data" in data.files:
        from .sources import npz_labels, npz_rows  # the official downsampled-ImageNet layout

        return npz_rows(str(path)), npz_labels(path)
    key = next((k for k in ("x", "images", "arr_0") if k in data.files), None)
    if key is None:
        raise KeyError(f"{path} holds {list(data.keys())}; put the images under 'x' or 'images'")
    return data[key], next((data[k] for k in ("y", "labels") if k in data.files), None)


def load_array(path: str | os.PathLike, size: int | None = None, resize: bool = False) -> ImageData:
    """An image array under checks.py's rules: uint8 as is, uint16 scaled, floats kept as they are
    (NaN/Inf refused), empty refused, non-square or other sizes refused unless ``resize``."""
    path = Path(path)
    arr, labels = _read_array(path)
    check_finite(arr, path)  # before any transpose: the index is in the file's own layout
    arr = to_nhwc(arr, path)
    stats = channel_stats(arr) if arr.dtype.kind == "f" else None
    if arr.dtype.kind != "f":
        arr = scale_integers(arr, path)
    img = torch.from_numpy(arr).permute(0, 3, 1, 2)  # an NCHW view: memory-mapped .npy stay mapped
    if check_geometry(img.shape[2], img.shape[3], size, path, resize):
        img = _resized(img, size)
    lab = None if labels is None else torch.as_tensor(np.asarray(labels)).long().view(-1)
    if lab is not None and len(lab) != len(img):
        raise ValueError(f"{path}: {len(lab)} labels for {len(img)} images; save one label per image")
    return ImageData(img, lab, [f"{path.name}[{i}]" for i in range(len(img))], stats=stats)


def _resized(img: torch.Tensor, size: int) -> torch.Tensor:
    """Explicit resize (--data_resize): antialiased bilinear, in the data's own range."""
    x = to_float(img)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return to_uint8(y) if img.dtype == torch.uint8 else y


def load_data(spec: str, size: int, channels: int = 3, progress: bool = True, resize: bool = False) -> ImageData:
    """'digits', a pack folder (memory-mapped), an image folder, or an .npz/.npy file."""
    from .packed import is_pack, open_pack

    if spec == "digits":
        return load_digits(size)
    path = Path(spec)
    if is_pack(path):
        return open_pack(path, size, channels)
    if path.is_dir():
        return load_folder(path, size, channels, progress)
    if path.suffix in (".npz", ".npy") and path.is_file():
        return load_array(path, size, resize)
    tar = " (.tar shards train once packed: python -m sgengine.data pack SHARDS OUT --size N)" \
        if str(spec).endswith(".tar") else ""
    raise FileNotFoundError(f"--data {spec!r} is neither 'digits', a pack, an image folder, nor an .npz/.npy file{tar}")


def report_skipped(data: ImageData, log=print) -> None:
    if data.skipped:
        log(f"skipped {len(data.skipped)} unreadable file(s); first: {data.skipped[0][0]} ({data.skipped[0][1]})")
    if data.stats is not None:
        how = "used as it is" if data.moments is None else "a posterior: each batch draws mean + std * eps"
        log(f"float data ({data.stats['dtype']}), {how}: per-channel mean {data.stats['mean']}, "
            f"std {data.stats['std']}")
