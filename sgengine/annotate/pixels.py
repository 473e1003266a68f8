"""Features for data with no extractor: raw pixels, or their PCA projection.

Computed in chunks of rows, so memory-mapped packs are read once, in order, and no float64
N x D matrix is ever formed: float32 output, the PCA from a D x D covariance accumulated in
float64 (exact, reproducible) and projected chunk by chunk.
"""
from __future__ import annotations

import torch

CHUNK = 2048  # rows per pass
MAX_PCA_DIM = 16384  # D x D float64 covariance: 2 GB at this D; beyond it use a ViT extractor or a smaller pack


def _rows(images: torch.Tensor, start: int) -> torch.Tensor:
    """Flattened float32 rows; uint8 pixels scaled to [-1, 1], float data (latents) as they are."""
    x = images[start:start + CHUNK].flatten(1).float()
    return x / 127.5 - 1.0 if images.dtype == torch.uint8 else x


def pixel_features(images: torch.Tensor, pca_dim: int | None = None) -> torch.Tensor:
    """(N, C, H, W) -> float32 (N, d): flattened pixels in [-1, 1], PCA-projected if asked."""
    n, d = len(images), images[0].numel()
    if not pca_dim:
        return torch.cat([_rows(images, a) for a in range(0, n, CHUNK)])
    if not 1 <= pca_dim <= min(n, d):
        raise ValueError(f"pca_dim must be in [1, {min(n, d)}] for {(n, d)} pixel features, got {pca_dim}")
    if d > MAX_PCA_DIM:
        raise ValueError(f"PCA of {d}-dimensional pixels needs a {d}x{d} covariance: use a ViT extractor, "
                         "or annotate a smaller pack (python -m sgengine.data pack SRC OUT --size 32)")
    mean, comps = _principal_axes(images, pca_dim)
    return torch.cat([(_rows(images, a).double() - mean) @ comps for a in range(0, n, CHUNK)]).float()


def _principal_axes(images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and the top-k eigenvectors (d, k) of the covariance, signs fixed (largest entry > 0)."""
    n, s, gram = len(images), 0.0, 0.0
    for a in range(0, n, CHUNK):
        x = _rows(images, a).double()
        s, gram = s + x.sum(0), gram + x.T @ x
    mean = s / n
    cov = gram / n - torch.outer(mean, mean)
    vals, vecs = torch.linalg.eigh(cov)
    comps = vecs[:, torch.argsort(vals, descending=True)[:k]]
    sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    return mean, comps * sign
