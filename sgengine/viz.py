"""Pictures for people: sample grids (rows = clusters) and training curves as PNG."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .common.io import atomic_write

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]  # line colours, first for single-series plots


def as_uint8(images: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Images (N, C, H, W) as uint8: uint8 unchanged; floats mapped from ``value_range`` to [0, 255].

    ``value_range`` None infers it: (-1, 1), the engine's samples, when any value is negative, else
    (0, 1). Values outside the range, or another dtype, raise a ValueError naming the fix, so a grid
    is never written black (or white) by a silent clamp.
    """
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}: convert them first")
    x = images.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or inf values: nothing sensible to draw")
    lo, hi = value_range if value_range is not None else ((-1.0, 1.0) if float(x.min()) < 0 else (0.0, 1.0))
    tol = 1e-3 * (hi - lo)
    if float(x.min()) < lo - tol or float(x.max()) > hi + tol:
        raise ValueError(f"float images span [{float(x.min()):.3g}, {float(x.max()):.3g}], outside the range "
                         f"[{lo:g}, {hi:g}]: pass value_range=(low, high), e.g. (0, 255), or uint8 images")
    return ((x.clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)


def make_grid(images: torch.Tensor, rows: int, pad: int = 1, value_range=None) -> np.ndarray:
    """Images (N, C, H, W) (see ``as_uint8``) -> uint8 (H', W', 3) grid with ``rows`` rows, row by row."""
    images = as_uint8(images, value_range)
    n, c, h, w = images.shape
    if c not in (1, 3, 4):
        raise ValueError(f"images need 1, 3 or 4 channels to draw, got {c}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cols = math.ceil(n / rows)
    img = images.expand(-1, 3, -1, -1) if c == 1 else images[:, :3]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img[i].permute(1, 2, 0).cpu().numpy()
    return grid


def save_grid(images: torch.Tensor, rows: int, path: str | os.PathLike, scale: int = 1,
              value_range: tuple[float, float] | None = None) -> Path:
    """Save a PNG grid of images (N, C, H, W) with ``rows`` rows (one per cluster when ordered by
    cluster): uint8, or floats in [-1, 1] / [0, 1] / ``value_range`` (checked, see ``as_uint8``)."""
    im = Image.fromarray(make_grid(images, rows, value_range=value_range))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(im, path)
    return path


def save_image(im: Image.Image, path: str | os.PathLike) -> Path:
    """Write an image atomically, in the format its suffix names (PNG when none): a killed run or a
    full disk never leaves half an image (common.io)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: im.save(tmp, format=fmt))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _canvas(size, title: str, left: int = 60, right: int = 20):
    """A white image with the plot frame and the title: (image, draw, frame box (x0, y0, x1, y1))."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    box = (left, 30, size[0] - right, size[1] - 40)
    d.rectangle(list(box), outline="black")
    d.text((left, 8), title, fill="black")
    return im, d, box


def plot_curve(xs, ys, path: str | os.PathLike, title: str, size=(640, 360)) -> Path:
    """A line plot drawn with PIL (no plotting dependency), log-scaled y when positive."""
    ys = np.asarray(ys, dtype=np.float64)
    logy = bool(len(ys) and (ys > 0).all())
    v = np.log10(ys) if logy else ys
    im, d, (x0, y0, x1, y1) = _canvas(size, f"{title}{' (log10)' if logy else ''}")
    if len(v) > 1 and np.isfinite(v).all():
        lo, hi = float(v.min()), float(v.max()) + 1e-12
        px = x0 + (np.asarray(xs, float) - xs[0]) / max(xs[-1] - xs[0], 1) * (x1 - x0)
        py = y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.line(list(zip(px.tolist(), py.tolist())), fill=PALETTE[0], width=2)
        d.text((4, y0), f"{10**hi if logy else hi:.3g}", fill="black")
        d.text((4, y1 - 10), f"{10**lo if logy else lo:.3g}", fill="black")
        d.text((x0, y1 + 8), f"step {xs[0]}", fill="black")
        d.text((x1 - 80, y1 + 8), f"step {xs[-1]}", fill="black")
    save_image(im, path)
    return Path(path)


def plot_bars(counts, path: str | os.PathLike, title: str, size=(640, 360)) -> Path:
    """A bar chart drawn with PIL: one bar per entry of ``counts`` (e.g. images per cluster)."""
    counts = np.asarray(counts, dtype=np.float64)
    im, d, (x0, y0, x1, y1) = _canvas(size, title)
    top = max(float(counts.max()) if counts.size else 0.0, 1.0)
    width = (x1 - x0) / max(counts.size, 1)
    for i, c in enumerate(counts):
        left = x0 + i * width
        d.rectangle([left + 0.1 * width, y1 - c / top * (y1 - y0), left + 0.9 * width, y1], fill=PALETTE[0])
    d.text((4, y0), f"{top:.0f}", fill="black")
    d.text((4, y1 - 10), "0", fill="black")
    d.text((x0, y1 + 8), f"{counts.size} bars", fill="black")
    save_image(im, path)
    return Path(path)



def _scale(v, lo, hi, a, b):
    return a + (np.asarray(v, float) - lo) / max(hi - lo, 1e-12) * (b - a)


def plot_lines(series: dict[str, tuple[list, list]], path, title: str, size=(720, 420)) -> Path:
    """Several named lines on shared axes, drawn with PIL (plot_curve draws one); legend at right."""
    im, d, (x0, y0, x1, y1) = _canvas(size, title[:110], left=70, right=170)
    xs = np.concatenate([np.asarray(s[0], float) for s in series.values()] or [np.zeros(1)])
    ys = np.concatenate([np.asarray(s[1], float) for s in series.values()] or [np.zeros(1)])
    (xlo, xhi), (ylo, yhi) = (xs.min(), xs.max()), (ys.min(), ys.max())
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = list(zip(_scale(sx, xlo, xhi, x0, x1).tolist(), _scale(sy, ylo, yhi, y1, y0).tolist()))
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        d.line([x1 + 10, y0 + 10 + 16 * i, x1 + 30, y0 + 10 + 16 * i], fill=color, width=3)
        d.text((x1 + 35, y0 + 4 + 16 * i), name[:22], fill="black")
    for v, y in ((yhi, y0), (ylo, y1 - 10)):
        d.text((4, y), f"{v:.4g}", fill="black")
    d.text((x0, y1 + 8), f"step {xlo:.0f}", fill="black")
    d.text((x1 - 70, y1 + 8), f"step {xhi:.0f}", fill="black")
    save_image(im, path)
    return Path(path)
