"""Self-labels: features -> L2-normalise -> k-means -> one cluster id per image (SPEC section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .io import Annotations
from .kmeans import KMeans
from .pixels import pixel_features


def self_label(features: torch.Tensor, k: int, niter: int = 30, seed: int = 0,
               normalize: bool = True, verbose: bool = False, backend: str = "auto",
               max_points_per_centroid: int | None = None) -> tuple[torch.Tensor, KMeans]:
    """Cluster ids int64 (N,) of (N, d) features with Euclidean k-means on L2-normalised features;
    ``backend`` and ``max_points_per_centroid`` (faiss's subsample) go to :class:`KMeans`."""
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf; check the extractor or the input images")
    x = F.normalize(features.float(), dim=1) if normalize else features.float()
    km = KMeans(x.shape[1], k, niter=niter, seed=seed, verbose=verbose, backend=backend,
                max_points_per_centroid=max_points_per_centroid).train(x)
    ids, _ = km.assign(x)
    return ids.long().cpu(), km


def label_annotations(features: torch.Tensor, k: int, settings: dict, **kw) -> Annotations:
    ids, km = self_label(features, k, **kw)
    objective = float(km.objective[-1]) if km.objective else float("nan")
    # kmeans_train_rows: the rows k-means trained on (all N unless a faiss subsample was asked for).
    return Annotations(ids, k, settings={**settings, "k": k, "kmeans_objective": objective,
                                         "kmeans_train_rows": km.train_rows, **kw})


def pixel_self_labels(images: torch.Tensor, k: int, pca_dim: int = 0, seed: int = 0, data: str = "") -> Annotations:
    """Self-labels of uint8 images (N, C, H, W) by k-means (30 iterations) on their pixels, or on the
    pixels' PCA projection when ``pca_dim`` > 0: the train CLI's in-process self-labels."""
    feats = pixel_features(images, pca_dim or None)
    settings = {"method": "labels", "features": f"pca{pca_dim}" if pca_dim else "pixels", "data": data,
                "n": len(images)}
    return label_annotations(feats, k, settings, niter=30, seed=seed)
