"""Fréchet distance between Gaussians fitted to features (FID, Heusel et al. 2017; FDD, Stein et al. 2023).

d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Heusel et al. eq. 6; Dowson & Landau 1982)

The trace of the matrix square root is computed without scipy's (non-symmetric, sometimes
complex-valued) sqrtm: S1 S2 is similar to the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), so
tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)), with both square roots taken by symmetric
eigen-decomposition in float64 and round-off negatives clamped to 0. This stays real and finite
for singular covariances (fewer samples than dimensions). As a last resort, if the
eigen-solver fails to converge, eps I is added to both covariances as pytorch-fid and clean-fid do.

Statistics files are .npz with arrays ``mu`` and ``sigma`` (the layout of pytorch-fid and
clean-fid, so their reference files load too) plus ``meta_<name>`` entries such as the
feature extractor's name, which ``frechet_from_stats`` compares before mixing two files.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from ..data import np_load


class FeatureStats(NamedTuple):
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    meta: dict


def _as_float64(a, name: str) -> np.ndarray:
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf: the features (or the images behind them) are broken")
    return a


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): mean (d,) and unbiased covariance (d, d) of (N, d) features, float64."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, d) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root by eigen-decomposition; round-off negative eigenvalues -> 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away round-off before the symmetric solver
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = _as_float64(mu, f"mu{name}"), _as_float64(sigma, f"sigma{name}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu{name} must be (d,) and sigma{name} (d, d), got {mu.shape} and {sigma.shape}")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(sigma).max())):
        raise ValueError(f"sigma{name} is not symmetric: pass a covariance matrix (see feature_stats)")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the quantity reported as FID)."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (same extractor for both?)")
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = eps * np.eye(mu1.shape[0])
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_from_features(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to two (N, d) feature sets."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def save_stats(path: str | os.PathLike, mu, sigma, **meta) -> None:
    """Write reference statistics to an .npz; ``meta`` values (str, int, float) are kept as meta_<name>."""
    mu, sigma = _check_stats(mu, sigma, "")
    for k, v in meta.items():
        if not isinstance(v, (str, int, float, bool)):
            raise TypeError(f"meta {k!r} must be a str, int, float or bool, got {type(v).__name__}")
    with open(path, "wb") as f:  # a file object stops numpy from appending '.npz' to the name
        np.savez(f, mu=mu, sigma=sigma, **{f"meta_{k}": np.asarray(v) for k, v in meta.items()})


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """(mu, sigma, meta) from an .npz written by ``save_stats``, pytorch-fid or clean-fid."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no statistics file at {path}: make one with save_stats(path, *feature_stats(f))")
    with np_load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (found {sorted(z.files)}): not a statistics file")
        meta = {k[5:]: z[k].item() for k in z.files if k.startswith("meta_")}
        return FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), meta)


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two loaded statistics, refusing to mix feature extractors."""
    ea, eb = a.meta.get("extractor"), b.meta.get("extractor")
    if ea is not None and eb is not None and ea != eb:
        raise ValueError(f"statistics come from different feature extractors ({ea!r} vs {eb!r}): "
                         "recompute one side with the other's extractor")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
