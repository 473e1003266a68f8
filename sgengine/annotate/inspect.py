"""A PNG to check annotations by eye: one row per cluster, example images with boxes or masks.

Rows are the most populous clusters (up to ``max_rows``, in id order); each row shows the first
``per_row`` images of its cluster, upscaled (nearest) to ``tile`` pixels. A 1-channel layout
(LOST boxes) is drawn as a red outline around the box; a K-channel layout (segments) is blended
in a fixed palette colour per segment (half opacity). Missing slots stay white.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..viz import save_grid
from .io import Annotations


def palette(k: int) -> torch.Tensor:
    """k distinct-ish RGB colours (k, 3) uint8, deterministic (golden-ratio hues)."""
    import colorsys

    return torch.tensor([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 1.0)]
                         for i in range(k)], dtype=torch.uint8)


def _rgb(images: torch.Tensor, tile: int) -> torch.Tensor:
    x = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    return F.interpolate(x.float(), size=(tile, tile), mode="nearest").round().to(torch.uint8)


def _draw_boxes(tiles: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Red outlines around each mask's extent; masks (B, 1, tile, tile)."""
    out = []
    for img, m in zip(tiles, masks[:, 0]):
        im = Image.fromarray(img.permute(1, 2, 0).numpy())
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys):
            ImageDraw.Draw(im).rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                                         outline=(255, 0, 0), width=max(1, m.shape[-1] // 48))
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


def _blend_segments(tiles: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    colour = palette(masks.shape[1])[masks.argmax(1)].permute(0, 3, 1, 2).float()  # (B, 3, t, t)
    return ((tiles.float() + colour) / 2).round().to(torch.uint8)


def overlay(images: torch.Tensor, layout: torch.Tensor | None, tile: int = 64) -> torch.Tensor:
    """uint8 RGB tiles (B, 3, tile, tile) of images (B, C, H, W) with their layout drawn on."""
    tiles = _rgb(images, tile)
    if layout is None:
        return tiles
    masks = F.interpolate(layout.float(), size=(tile, tile), mode="nearest").to(torch.uint8)
    return _draw_boxes(tiles, masks) if layout.shape[1] == 1 else _blend_segments(tiles, masks)


def rows_of(ann: Annotations, per_row: int, max_rows: int) -> tuple[list[int], list[list[int]]]:
    """(clusters shown, the image indices of each row)."""
    counts = ann.counts()
    top = torch.argsort(counts, descending=True, stable=True)[:max_rows]
    shown = sorted(top[counts[top] > 0].tolist())
    return shown, [torch.nonzero(ann.ids == c).flatten()[:per_row].tolist() for c in shown]


def render_annotations(images: torch.Tensor, ann: Annotations, path: str | os.PathLike, per_row: int = 8,
                       max_rows: int = 20, tile: int = 64) -> Path:
    """Write the inspection PNG (rows = clusters) and return its path."""
    if len(images) != len(ann):
        raise ValueError(f"{len(images)} images but {len(ann)} annotations: pass the annotated data")
    shown, rows = rows_of(ann, per_row, max_rows)
    blank = torch.full((3, tile, tile), 255, dtype=torch.uint8)
    tiles = []
    for idx in rows:
        sel = torch.tensor(idx, dtype=torch.long)
        made = overlay(images[sel], None if ann.layout is None else ann.layout[sel], tile)
        tiles += list(made) + [blank] * (per_row - len(idx))
    return save_grid(torch.stack(tiles), len(shown), path)
