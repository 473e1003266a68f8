"""Inception score and improved precision/recall, from precomputed classifier outputs or features.

- ``inception_score``: IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, section 4), averaged
  over ``splits`` contiguous chunks as in the original code, torch-fidelity and StyleGAN's metrics.
- ``precision_recall``: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", eqs. 1-3: each set's manifold is the union of hyperspheres around
  its points with radius = distance to the k-th nearest neighbour in the same set; precision is
  the fraction of generated samples inside the real manifold, recall the fraction of real samples
  inside the generated one. Distances are computed in row blocks so memory stays at
  batch_size x N (e.g. 1024 x 50k floats = 200 MB) on any device.
"""
from __future__ import annotations

import torch


def _as_2d(a, name: str, dtype=torch.float64, device=None) -> torch.Tensor:
    a = torch.as_tensor(a).to(device=device, dtype=dtype)
    if a.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) array, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over ``splits`` chunks of (N, C) class probabilities p(y|x).

    probs: softmax outputs of a classifier (for FID's Inception: softmax of the 1008 bias-free logits).
    """
    p = _as_2d(probs, "probs")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-3):
        raise ValueError("probs must be class probabilities (rows >= 0 summing to 1): apply softmax to logits")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    n = p.shape[0]
    scores = torch.stack([_split_score(p[i * n // splits:(i + 1) * n // splits]) for i in range(splits)])
    return scores.mean().item(), scores.std(unbiased=False).item()


def _split_score(p: torch.Tensor) -> torch.Tensor:
    """exp(mean_x KL(p(y|x) || p(y))) with p(y) the chunk's marginal; 0 log 0 = 0."""
    py = p.mean(0, keepdim=True)
    kl = torch.special.xlogy(p, p) - torch.special.xlogy(p, py)
    return kl.sum(1).mean().exp()


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) through one matmul."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
    return d.clamp_min_(0)


def knn_radii(feats: torch.Tensor, k: int, batch_size: int = 1024) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    blocks = [_sq_dists(feats[i:i + batch_size], feats).kthvalue(k + 1, dim=1).values
              for i in range(0, len(feats), batch_size)]  # k + 1: the point itself is at distance 0
    return torch.cat(blocks)


def in_manifold(query: torch.Tensor, feats: torch.Tensor, radii: torch.Tensor, batch_size: int = 1024):
    """(len(query),) bool: inside at least one hypersphere (feats_j, radii_j) (Kynkäänniemi eq. 1)."""
    blocks = [(_sq_dists(query[i:i + batch_size], feats) <= radii[None]).any(1)
              for i in range(0, len(query), batch_size)]
    return torch.cat(blocks)


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones (Kynkäänniemi et al. 2019, eqs. 2-3).

    Features are (N, d) arrays; distances are computed in float32 on ``device`` (default: where the
    real features are). The paper uses k = 3 and VGG-16 fc2 features of 50k images per set.
    """
    device = device if device is not None else getattr(real_feats, "device", "cpu")
    real = _as_2d(real_feats, "real_feats", torch.float32, device)
    fake = _as_2d(fake_feats, "fake_feats", torch.float32, device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]} (same extractor?)")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be in [1, min(N_real, N_fake) - 1 = {min(len(real), len(fake)) - 1}], got {k}")
    precision = in_manifold(fake, real, knn_radii(real, k, batch_size), batch_size).sum().item() / len(fake)
    recall = in_manifold(real, fake, knn_radii(fake, k, batch_size), batch_size).sum().item() / len(real)
    return precision, recall
