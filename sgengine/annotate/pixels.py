"""Features for data with no extractor: raw pixels, or their PCA projection."""
from __future__ import annotations

import torch


def pixel_features(images: torch.Tensor, pca_dim: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, d): flattened pixels in [-1, 1], PCA-projected if asked.

    PCA is exact (SVD of the centred data, float64) for reproducibility.
    """
    x = images.flatten(1).double() / 127.5 - 1.0
    if not pca_dim:
        return x.float()
    if not 1 <= pca_dim <= min(x.shape):
        raise ValueError(f"pca_dim must be in [1, {min(x.shape)}] for {tuple(x.shape)} pixel features, got {pca_dim}")
    xc = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    return (xc @ vh[:pca_dim].T).float()
