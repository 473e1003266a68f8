"""Evaluation: Frechet distance, Inception Score, precision/recall, feature extractors."""
from .cluster import cluster_report, format_report, hungarian_accuracy
from .features import (INCEPTION_ENV, ClassifierExtractor, FeatureExtractor, batched_features,
                       batched_features_and_probs, dinov2_extractor, find_inception_weights,
                       inception_extractor, to_uint8_rgb)
from .frechet import (FeatureStats, feature_stats, frechet_distance, frechet_from_features,
                      frechet_from_stats, load_stats, save_stats)
from .metrics import inception_score, precision_recall

__all__ = [
    "cluster_report", "format_report", "hungarian_accuracy",
    "INCEPTION_ENV", "ClassifierExtractor", "FeatureExtractor", "batched_features",
    "batched_features_and_probs", "dinov2_extractor", "find_inception_weights", "inception_extractor",
    "to_uint8_rgb", "FeatureStats", "feature_stats", "frechet_distance", "frechet_from_features",
    "frechet_from_stats", "load_stats", "save_stats", "inception_score", "precision_recall",
]
