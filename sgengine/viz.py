"""Pictures for people: sample grids (rows = clusters) and training curves as PNG."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def make_grid(images: torch.Tensor, rows: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (H', W', 3) grid with ``rows`` rows, filled row by row."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    img = images.expand(-1, 3, -1, -1) if c == 1 else images[:, :3]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img[i].permute(1, 2, 0).cpu().numpy()
    return grid


def save_grid(images: torch.Tensor, rows: int, path: str | os.PathLike, scale: int = 1) -> Path:
    """Save a PNG grid (one row per cluster when images are ordered by cluster)."""
    im = Image.fromarray(make_grid(images, rows))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curve(xs, ys, path: str | os.PathLike, title: str, size=(640, 360)) -> Path:
    """A line plot drawn with PIL (no plotting dependency), log-scaled y when positive."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    ys = np.asarray(ys, dtype=np.float64)
    logy = bool(len(ys) and (ys > 0).all())
    v = np.log10(ys) if logy else ys
    x0, y0, x1, y1 = 60, 30, size[0] - 20, size[1] - 40
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 8), f"{title}{' (log10)' if logy else ''}", fill="black")
    if len(v) > 1 and np.isfinite(v).all():
        lo, hi = float(v.min()), float(v.max()) + 1e-12
        px = x0 + (np.asarray(xs, float) - xs[0]) / max(xs[-1] - xs[0], 1) * (x1 - x0)
        py = y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.line(list(zip(px.tolist(), py.tolist())), fill=(31, 119, 180), width=2)
        d.text((4, y0), f"{10**hi if logy else hi:.3g}", fill="black")
        d.text((4, y1 - 10), f"{10**lo if logy else lo:.3g}", fill="black")
        d.text((x0, y1 + 8), f"step {xs[0]}", fill="black")
        d.text((x1 - 80, y1 + 8), f"step {xs[-1]}", fill="black")
    im.save(path)
    return Path(path)


def plot_bars(counts, path: str | os.PathLike, title: str, size=(640, 360)) -> Path:
    """A bar chart drawn with PIL: one bar per entry of ``counts`` (e.g. images per cluster)."""
    counts = np.asarray(counts, dtype=np.float64)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = 60, 30, size[0] - 20, size[1] - 40
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 8), title, fill="black")
    top = max(float(counts.max()) if counts.size else 0.0, 1.0)
    width = (x1 - x0) / max(counts.size, 1)
    for i, c in enumerate(counts):
        left = x0 + i * width
        d.rectangle([left + 0.1 * width, y1 - c / top * (y1 - y0), left + 0.9 * width, y1], fill=(31, 119, 180))
    d.text((4, y0), f"{top:.0f}", fill="black")
    d.text((4, y1 - 10), "0", fill="black")
    d.text((x0, y1 + 8), f"{counts.size} bars", fill="black")
    im.save(path)
    return Path(path)
