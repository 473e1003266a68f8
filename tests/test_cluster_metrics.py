"""Cluster metrics against scikit-learn / scipy and brute force, on random and structured ids."""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from sklearn import metrics as skm

from sgengine.eval.cluster import cluster_report, contingency, format_report, hungarian_accuracy


def _random(seed, n=500, k=7, c=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, n), rng.integers(0, c, n)


@pytest.mark.parametrize("seed,k,c", [(0, 7, 5), (1, 3, 9), (2, 12, 12)])
def test_nmi_ari_anmi_match_sklearn_on_random_labels(seed, k, c):
    ids, labels = _random(seed, k=k, c=c)
    r = cluster_report(ids, k, labels)
    assert r["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, ids), abs=1e-10)
    assert r["ari"] == pytest.approx(skm.adjusted_rand_score(labels, ids), abs=1e-10)
    assert r["anmi"] == pytest.approx(skm.adjusted_mutual_info_score(labels, ids), abs=1e-10)
    assert abs(r["ari"]) < 0.05 and abs(r["anmi"]) < 0.05  # chance agreement is adjusted away


def _brute_accuracy(ids, labels):
    """Best injective map of clusters to labels (or labels to clusters), by enumeration."""
    k, c = int(ids.max()) + 1, int(labels.max()) + 1
    best = 0
    if k <= c:
        for perm in itertools.permutations(range(c), k):
            best = max(best, sum(int(perm[i] == y) for i, y in zip(ids, labels)))
    else:
        for perm in itertools.permutations(range(k), c):
            best = max(best, sum(int(perm[y] == i) for i, y in zip(ids, labels)))
    return best / len(ids)


@pytest.mark.parametrize("seed,k,c", [(3, 4, 4), (4, 5, 3), (5, 3, 5)])
def test_hungarian_accuracy_matches_brute_force(seed, k, c):
    ids, labels = _random(seed, n=60, k=k, c=c)
    assert hungarian_accuracy(contingency(ids, labels)) == pytest.approx(_brute_accuracy(ids, labels))


def test_permuted_perfect_clustering_scores_one():
    labels = np.repeat(np.arange(6), 20)
    ids = np.array([3, 0, 5, 1, 4, 2])[labels]
    r = cluster_report(torch.from_numpy(ids), 6, torch.from_numpy(labels))
    for key in ("nmi", "ari", "anmi", "accuracy", "utilisation"):
        assert r[key] == pytest.approx(1.0)
    assert r["kl_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_utilisation_and_kl_to_uniform_without_labels():
    ids = np.array([0, 0, 0, 2, 2, 5])
    r = cluster_report(ids, 8)
    assert r["used"] == 3 and r["utilisation"] == pytest.approx(3 / 8)
    p = np.bincount(ids, minlength=8) / len(ids)
    assert r["kl_uniform"] == pytest.approx(entropy(p, np.full(8, 1 / 8)))
    assert "nmi" not in r
    assert "3/8 clusters used" in format_report(r)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="must be < k"):
        cluster_report(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="same length"):
        cluster_report(np.array([0, 1, 1]), 2, np.array([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        cluster_report(np.array([0.5, 1.0]), 2)
