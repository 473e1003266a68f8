"""LOST: one object box per image from the last attention layer's keys (Simeoni et al. 2021).

For the P patch keys k_p of an image (section 3.1 of the paper; batched here, on the GPU when the
keys are there):
1. affinity A = K K^T (P x P); degree d_p = #{q != p : A_pq > 0} (eq. 1, the zeroed diagonal of the
   authors' code);
2. seed s = the lowest-degree patch (eq. 2): objects cover fewer patches than background, so an
   object patch correlates positively with few others;
3. expansion set S = those of the k lowest-degree patches (k = 100) with A_sq > 0 (section 3.2);
4. mask m_q = [sum_{p in S} A_pq > 0] (eq. 3); box = extent of the 4-connected component of m
   containing the seed (section 3.3; scipy.ndimage.label's default connectivity in their code).
If the seed falls outside its own mask (which LOST's code treats as impossible) the box is the
seed patch alone. Boxes are mapped from the patch grid to pixels of the training resolution.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..device import resolve_device
from .io import Annotations
from .labels import label_annotations

_CROSS = torch.tensor([[0., 1., 0.], [1., 1., 1.], [0., 1., 0.]]).view(1, 1, 3, 3)


def lost_seeds(keys: torch.Tensor, k: int = 100):
    """(seed (B,), mask (B, P) bool of eq. 3) from patch keys (B, P, D)."""
    a = torch.bmm(keys.float(), keys.float().transpose(1, 2))
    pos = a > 0
    pos.diagonal(dim1=1, dim2=2).fill_(False)
    order = torch.sort(pos.sum(2), dim=1, stable=True).indices  # ascending degree; ties: lowest index
    seed = order[:, 0]
    pot = order[:, :min(k, a.shape[1])]
    rows = torch.arange(len(a), device=a.device)
    a_seed = a[rows, seed]  # (B, P): affinities of the seed
    similar = torch.gather(a_seed, 1, pot) > 0  # (B, k): expansion set membership
    score = torch.einsum("bk,bkq->bq", similar.float(), torch.gather(a, 1, pot[..., None].expand(-1, -1, a.shape[2])))
    return seed, score > 0


def seed_component(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of ``mask`` (B, H, W) bool containing ``seed`` (B,) (flat index),
    by flood fill (repeated cross-shaped dilation inside the mask). A seed outside its mask gives
    the seed pixel alone."""
    b, h, w = mask.shape
    comp = torch.zeros(b, h * w, dtype=torch.bool, device=mask.device)
    comp[torch.arange(b, device=mask.device), seed] = True
    comp = comp.view(b, 1, h, w)
    inside = mask.view(b, 1, h, w) | comp  # a seed outside the mask stays, alone
    alone = ~mask.view(b, h * w).gather(1, seed[:, None]).view(b, 1, 1, 1)
    kernel = _CROSS.to(mask.device)
    for _ in range(h * w):
        grown = (F.conv2d(comp.float(), kernel, padding=1) > 0) & inside & ~alone
        grown |= comp
        if torch.equal(grown, comp):
            break
        comp = grown
    return comp.view(b, h, w)


def component_boxes(comp: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Boxes (B, 4) int64 [x0, y0, x1, y1) in pixels of an image of ``size`` from grid masks (B, h, w)
    (each non-empty): the grid extent scaled by size / grid, outer edges rounded outwards."""
    b, h, w = comp.shape
    sh, sw = (size, size) if isinstance(size, int) else size
    ys, xs = comp.any(2), comp.any(1)
    idx_y, idx_x = torch.arange(h, device=comp.device), torch.arange(w, device=comp.device)
    y0 = torch.where(ys, idx_y, h).amin(1)
    y1 = torch.where(ys, idx_y, -1).amax(1) + 1
    x0 = torch.where(xs, idx_x, w).amin(1)
    x1 = torch.where(xs, idx_x, -1).amax(1) + 1
    to_px = lambda v, n, s: (v * s).div(n, rounding_mode="floor")  # noqa: E731
    up_px = lambda v, n, s: (v * s + n - 1).div(n, rounding_mode="floor")  # noqa: E731
    return torch.stack([to_px(x0, w, sw), to_px(y0, h, sh), up_px(x1, w, sw), up_px(y1, h, sh)], 1).long()


def box_masks(boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """One-box binary masks (B, 1, H, W) uint8 of boxes (B, 4) [x0, y0, x1, y1)."""
    sh, sw = (size, size) if isinstance(size, int) else size
    ys = torch.arange(sh, device=boxes.device)[None, :, None]
    xs = torch.arange(sw, device=boxes.device)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).to(torch.uint8)[:, None]


def lost_boxes(keys: torch.Tensor, grid: tuple[int, int], size: int | tuple[int, int], k: int = 100,
               batch_size: int = 256, device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LOST boxes of all images: keys (N, P, D) of the patch tokens on a (rows, cols) grid ->
    (boxes (N, 4) int64 [x0, y0, x1, y1) in pixels of ``size``, masks (N, 1, H, W) uint8)."""
    h, w = (int(g) for g in grid)
    if keys.dim() != 3 or keys.shape[1] != h * w:
        raise ValueError(f"keys must be (N, P={h}x{w}, D) for grid {grid}, got {tuple(keys.shape)}")
    if k < 1:
        raise ValueError(f"k (the expansion set size) must be >= 1, got {k}")
    device = resolve_device(device, keys.device)
    boxes = []
    for i in tqdm(range(0, len(keys), batch_size), desc="LOST", disable=not progress):
        kb = keys[i:i + batch_size].to(device)
        seed, mask = lost_seeds(kb, k)
        boxes.append(component_boxes(seed_component(mask.view(-1, h, w), seed), size).cpu())
    boxes = torch.cat(boxes)
    return boxes, box_masks(boxes, size)


def box_annotations(features: torch.Tensor, keys: torch.Tensor, grid, size: int, k: int, settings: dict,
                    lost_k: int = 100, seed: int = 0, device=None, progress: bool = False) -> Annotations:
    """Self-boxed guidance (SPEC section 1): the image-level cluster id from self-labels of the
    global features plus the LOST box as a 1-channel mask layout (N, 1, size, size)."""
    ann = label_annotations(features, k, settings, niter=30, seed=seed)
    boxes, masks = lost_boxes(keys, grid, size, lost_k, device=device, progress=progress)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    info = {"lost_k": lost_k, "mean_box_area_fraction": float(area.float().mean() / (size * size))}
    return dataclasses.replace(ann, layout=masks, settings={**ann.settings, **info})
