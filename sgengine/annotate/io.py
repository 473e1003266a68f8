"""The annotation file: per-image guidance signals that ``sgengine.train`` reads.

A safetensors file with
- ``ids``    int64 (N,): the image-level cluster id of each image (self-labels);
- ``cond``   float32 (N, K), optional: a multi-hot image-level vector (self-segments);
- ``layout`` uint8 (N, C, H, W), optional: box masks (C=1) or one-hot segments (C=K);
and metadata recording the method, K and the feature / clustering settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..common.io import atomic_write

FORMAT = "sgengine-annotations/1"


@dataclass
class Annotations:
    ids: torch.Tensor
    k: int
    cond: torch.Tensor | None = None
    layout: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ids.dim() != 1:
            raise ValueError(f"ids must be (N,), got {tuple(self.ids.shape)}")
        if int(self.ids.max()) >= self.k or int(self.ids.min()) < 0:
            raise ValueError(f"cluster ids must lie in [0, {self.k}); got [{int(self.ids.min())}, {int(self.ids.max())}]")

    def __len__(self) -> int:
        return self.ids.shape[0]

    def counts(self) -> torch.Tensor:
        """Empirical cluster frequencies of the training set, int64 (K,)."""
        return torch.bincount(self.ids, minlength=self.k)

    def vector(self, idx: torch.Tensor) -> torch.Tensor:
        """The image-level condition for images ``idx``: multi-hot if stored, else one-hot, (B, K)."""
        if self.cond is not None:
            return self.cond[idx].float()
        return torch.nn.functional.one_hot(self.ids[idx], self.k).float()


def save_annotations(path: str | os.PathLike, ann: Annotations) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a file."""
    tensors = {"ids": ann.ids.long().contiguous()}
    if ann.cond is not None:
        tensors["cond"] = ann.cond.float().contiguous()
    if ann.layout is not None:
        tensors["layout"] = ann.layout.to(torch.uint8).contiguous()
    meta = {"format": FORMAT, "k": str(ann.k), "settings": json.dumps(ann.settings)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_annotations(path: str | os.PathLike) -> Annotations:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sgengine annotation file (format {meta.get('format')!r}); "
                         "make one with `python -m sgengine.annotate`")
    t = load_file(str(path))
    return Annotations(t["ids"], int(meta["k"]), t.get("cond"), t.get("layout"), json.loads(meta["settings"]))
