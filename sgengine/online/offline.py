"""Offline self-guidance (SPEC section 2, paper section 5 "offline guidance"): k-means on the
features of a trained diffusion model, written as an annotation file for
``python -m sgengine.train --condition annotations --annotations FILE``.

The paper's best setting is layer 10 of U-ViT-L's 21 blocks (0-based: the mid-block, with 10
in-blocks before it) at t = 0.2 in its time convention, which is t = 0.8 here (t = 1 data); for
other depths the mid-block is the same position. Features come from
``sgengine.annotate.features.DiffusionExtractor`` (noise to t, one forward with the null
condition, the block's patch tokens mean-pooled), clustering from ``sgengine.annotate``'s
k-means on L2-normalised features (SPEC section 1).
"""
from __future__ import annotations

import os

from ..annotate.features import DiffusionExtractor, extract
from ..annotate.io import Annotations, save_annotations
from ..annotate.labels import label_annotations
from ..data import ImageData

SPEC_LAYER = "mid"  # layer 10 of 21 = the mid-block of a 21-block U-ViT
SPEC_T = 0.8  # the paper's t = 0.2 with t = 1 data


def offline_annotations(run_dir: str | os.PathLike, data: ImageData, k: int, out: str | os.PathLike,
                        layer: int | str = SPEC_LAYER, t: float | None = SPEC_T, niter: int = 30,
                        seed: int = 0, batch_size: int = 64, device: str = "cpu",
                        progress: bool = False) -> Annotations:
    """Cluster ``data``'s features of the model in ``run_dir`` at (layer, t) into k groups and
    write the annotation file ``out``; t=None takes the objective's default level."""
    if k < 2 or k > len(data):
        raise ValueError(f"k must lie in [2, {len(data)}] (the number of images), got {k}")
    ext = DiffusionExtractor(run_dir, layer, t, seed=seed, device=device)
    feats = extract(ext, data.images, batch_size=batch_size, progress=progress, keep=("cls",))["cls"]
    settings = {"method": "offline self-guidance", **ext.settings, "n": len(data)}
    ann = label_annotations(feats, k, settings, niter=niter, seed=seed)
    save_annotations(out, ann)
    return ann
