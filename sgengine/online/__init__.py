"""Online self-guidance: prototypes clustered from the model's own features during training.

SPEC section 2. ``OnlineClustering`` (head + prototypes + Sinkhorn loss), ``OnlineTrainer`` (the
two-stage schedule), prototype / exemplar conditioning for sampling, and the offline variant
(k-means on a trained model's features -> an annotation file).
"""
from .clustering import OnlineClustering, feature_time, prototype_ids, sk_weight
from .offline import offline_annotations
from .trainer import (OnlineGenerator, OnlineTrainer, load_online, prototype_condition, prototype_of_exemplar,
                      sample_prototypes, top_prototypes)

__all__ = ["OnlineClustering", "OnlineGenerator", "OnlineTrainer", "feature_time", "load_online",
           "offline_annotations", "prototype_condition", "prototype_ids", "prototype_of_exemplar",
           "sample_prototypes", "sk_weight", "top_prototypes"]
