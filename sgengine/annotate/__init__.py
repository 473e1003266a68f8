"""Self-annotation: features -> clusters (k-means, TEMI), boxes (LOST) or segments (STEGO-style)
-> the annotation file that ``sgengine.train --condition annotations`` reads."""
from .features import DiffusionExtractor, PixelExtractor, ViTExtractor, extract, make_extractor
from .inspect import render_annotations
from .io import Annotations, load_annotations, save_annotations
from .kmeans import KMeans, kmeans
from .labels import label_annotations, self_label
from .lost import box_annotations, lost_boxes
from .stego import StegoConfig, segment_annotations, train_stego
from .temi import TEMIConfig, cluster_count_bound, temi_annotations, temi_cluster

__all__ = [
    "DiffusionExtractor", "PixelExtractor", "ViTExtractor", "extract", "make_extractor",
    "render_annotations", "Annotations", "load_annotations", "save_annotations", "KMeans", "kmeans",
    "label_annotations", "self_label", "box_annotations", "lost_boxes", "StegoConfig",
    "segment_annotations", "train_stego", "TEMIConfig", "cluster_count_bound", "temi_annotations", "temi_cluster",
]
