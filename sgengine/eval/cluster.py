"""Cluster quality: agreement with labels when they exist, balance always.

With labels: NMI (arithmetic-mean normalisation, scikit-learn's default), ARI (Hubert & Arabie
1985), adjusted NMI (Vinh et al. 2010; the ANMI that C-EDM, Adaloglou et al. 2023, reports) and
Hungarian accuracy (best one-to-one cluster-to-class map, scipy's linear_sum_assignment; with more
clusters than classes the unmatched clusters count as errors). Without labels: utilisation (the
fraction of the K clusters that hold at least one image, C_u / C in C-EDM section 3.3) and the KL
divergence of the cluster frequencies to uniform, KL(p || U) = log K - H(p) (0 = perfectly balanced).
NMI, ARI and accuracy come from one contingency table; adjusted NMI needs the expected mutual
information under permutation, which scikit-learn computes, so it is imported, not re-derived.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_ids(x, name: str) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must be non-negative ids, found {a.min()}")
    return a.astype(np.int64)


def contingency(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """n_ij = #images in cluster i with label j, (max id + 1, max label + 1) int64."""
    k, c = int(ids.max()) + 1, int(labels.max()) + 1
    return np.bincount(ids * c + labels, minlength=k * c).reshape(k, c)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_info(n: np.ndarray) -> float:
    total = n.sum()
    i, j = np.nonzero(n)
    nij = n[i, j].astype(np.float64)
    a, b = n.sum(1)[i].astype(np.float64), n.sum(0)[j].astype(np.float64)
    return float((nij / total * (np.log(nij * total) - np.log(a * b))).sum())


def nmi(n: np.ndarray) -> float:
    """MI / mean(H(ids), H(labels)); 1 when both partitions have a single block (sklearn's rule)."""
    h1, h2 = _entropy(n.sum(1)), _entropy(n.sum(0))
    if h1 == 0 and h2 == 0:
        return 1.0
    return _mutual_info(n) / max((h1 + h2) / 2, np.finfo(np.float64).eps)


def ari(n: np.ndarray) -> float:
    """Adjusted Rand index from pair counts (Hubert & Arabie 1985)."""
    comb = lambda x: (x.astype(np.float64) * (x - 1) / 2).sum()  # noqa: E731  (pairs within blocks)
    total = n.sum()
    s_ij, s_a, s_b = comb(n), comb(n.sum(1)), comb(n.sum(0))
    expected = s_a * s_b / (total * (total - 1) / 2) if total > 1 else 0.0
    top = (s_a + s_b) / 2 - expected
    return 1.0 if top == 0 else float((s_ij - expected) / top)


def hungarian_accuracy(n: np.ndarray) -> float:
    """Fraction of images whose cluster maps to their label under the best one-to-one map."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(n, maximize=True)
    return float(n[rows, cols].sum() / n.sum())


def balance(ids: np.ndarray, k: int) -> dict:
    """Utilisation C_u / K and KL(cluster frequencies || uniform) in nats."""
    counts = np.bincount(ids, minlength=k)
    return {"k": k, "used": int((counts > 0).sum()), "utilisation": float((counts > 0).sum() / k),
            "kl_uniform": float(np.log(k) - _entropy(counts))}


def cluster_report(ids, k: int, labels=None) -> dict:
    """Balance of ``ids`` (N,) over K clusters; with ``labels`` (N,) also NMI, ARI, adjusted NMI, accuracy."""
    ids = _as_ids(ids, "ids")
    if ids.size == 0:
        raise ValueError("ids is empty: nothing to evaluate")
    if ids.max() >= k:
        raise ValueError(f"cluster ids must be < k={k}, found {ids.max()}: pass the number of clusters used")
    out = balance(ids, k)
    if labels is None:
        return out
    labels = _as_ids(labels, "labels")
    if labels.shape != ids.shape:
        raise ValueError(f"labels {labels.shape} and ids {ids.shape} must have the same length")
    from sklearn.metrics import adjusted_mutual_info_score

    n = contingency(ids, labels)
    return {**out, "nmi": nmi(n), "ari": ari(n), "anmi": float(adjusted_mutual_info_score(labels, ids)),
            "accuracy": hungarian_accuracy(n)}


def format_report(report: dict) -> str:
    """One line for logs: 'utilisation 1.000 (10/10 used), KL to uniform 0.012, NMI 0.71, ...'."""
    parts = [f"utilisation {report['utilisation']:.3f} ({report['used']}/{report['k']} clusters used)",
             f"KL to uniform {report['kl_uniform']:.4f}"]
    names = {"nmi": "NMI", "ari": "ARI", "anmi": "adjusted NMI", "accuracy": "accuracy"}
    parts += [f"{label} {report[key]:.4f}" for key, label in names.items() if key in report]
    return ", ".join(parts)
