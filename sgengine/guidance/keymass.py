"""The key-mass pieces shared by every attention hook (the engine's ``MultiHeadAttention`` in
attach.py, diffusers' processors in diffusers_unet.py): one place, imported by both."""
from __future__ import annotations

import math

import torch

from ..kernels.attention_key_mass import attention_with_key_mass


def mass_to_grid(mass: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, Nk) -> (B, h, w): the last h*w keys are the image tokens (extras come first)."""
    if grid is None:  # no 4-D input seen: only a square grid of every key is unambiguous
        side = math.isqrt(mass.shape[1])
        if side * side != mass.shape[1]:
            raise ValueError(f"attention layer has {mass.shape[1]} keys and no known grid: "
                             "hook a layer whose block receives the (B, C, h, w) map")
        grid = (side, side)
    h, w = grid
    if h * w > mass.shape[1]:
        raise ValueError(f"attention layer has {mass.shape[1]} keys, fewer than its {h}x{w} grid")
    return mass[:, mass.shape[1] - h * w:].reshape(mass.shape[0], h, w)


def attend_rows(q, k, v, rows: int | None, plain, backend: str):
    """Attention with the key mass of the first ``rows`` samples only (all when None): the rest
    (the conditional half of a CFG batch) takes the ``plain`` attention, skipping the mass pass."""
    n = q.shape[0] if rows is None else min(rows, q.shape[0])
    out, mass = attention_with_key_mass(q[:n], k[:n], v[:n], backend=backend)
    if n < q.shape[0]:
        out = torch.cat([out, plain(q[n:], k[n:], v[n:])])
    return out, mass
