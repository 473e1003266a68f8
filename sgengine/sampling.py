"""Sampling API: load a checkpoint's EMA model and draw cluster-conditioned samples."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import TrainConfig, from_dict
from .data.latents import to_images
from .guidance.attach import list_attention_layers
from .guidance.cfg import CFG
from .guidance.param import parameterization_for
from .guidance.sag import SAG
from .training.checkpoint import load_meta, load_weights, resolve_checkpoint
from .training.objectives import Objective, build_network, make_objective, run_sampler


@dataclass
class Generator:
    """A trained model ready to sample: EMA denoiser, config, cluster frequencies, objective."""
    net: torch.nn.Module  # the objective-wrapped network (e.g. EDMPrecond(UNet))
    cfg: TrainConfig
    counts: torch.Tensor | None  # empirical cluster counts of the training set (K,)
    objective: Objective

    @property
    def k(self) -> int:
        """Size of the condition vector (0: unconditional)."""
        if self.cfg.arch == "uvit":
            return self.cfg.uvit.cond_dim or 0
        return self.cfg.model.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "ema") -> Generator:
    """Load a run folder or checkpoint folder written by ``sgengine.train``."""
    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    cfg = from_dict(meta["config"])
    obj = make_objective(cfg)
    net = obj.wrap(build_network(cfg))
    net.load_state_dict(load_weights(ckpt, which))
    counts = torch.tensor(meta["cluster_counts"]) if meta.get("cluster_counts") else None
    return Generator(net.to(device).eval(), cfg, counts, obj)


def draw_clusters(counts: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n cluster ids drawn from the training set's empirical cluster frequencies."""
    return torch.multinomial(counts.double(), n, replacement=True, generator=generator)


def sample(gen: Generator, clusters: torch.Tensor | None, n: int | None = None, *, w: float = 2.0,
           steps: int = 50, sampler: str | None = None, seed: int = 0,
           layout: torch.Tensor | None = None, progress: bool = False, sag_scale: float = 0.0,
           sag_layer: str | None = None, sag_threshold: float = 1.0, sag_blur=(9, 1.0),
           sag_window=None) -> torch.Tensor:
    """Samples as floats in [-1, 1], (n, C, H, W). ``clusters``: ids (n,), or None to draw them.

    ``sag_scale`` > 0 adds self-attention guidance (``sgengine.guidance.sag.SAG``) on top of CFG,
    reading ``sag_layer`` (default: the mid-block attention; see ``list_attention_layers``);
    ``sag_window`` = (t_lo, t_hi) in the sampler's time restricts it to those steps.
    """
    g = torch.Generator().manual_seed(seed)
    if gen.k and clusters is None:
        clusters = draw_clusters(gen.counts, n, g) if gen.counts is not None else torch.randint(gen.k, (n,), generator=g)
    n = len(clusters) if clusters is not None else n
    m = gen.cfg.uvit if gen.cfg.arch == "uvit" else gen.cfg.model
    x = torch.randn(n, m.in_channels, m.img_size, m.img_size, generator=g).to(gen.device)
    cond = {}
    if gen.k:
        cond["y"] = _one_hot(clusters, gen.k, gen.device)
        cond["layout"] = None if layout is None else layout.to(gen.device)
    if sag_scale:
        param = parameterization_for(gen.cfg.objective, gen.cfg)
        with SAG(gen.net, param, sag_layer or default_sag_layer(gen.net), sag_scale, sag_threshold,
                 sag_blur, sag_window, w=w if gen.k else None, **cond) as denoise:
            return run_sampler(gen.objective, sampler, denoise, x, steps, generator=g, progress=progress)
    denoise = CFG(gen.net, w, **cond) if gen.k else _uncond(gen.net)
    return run_sampler(gen.objective, sampler, denoise, x, steps, generator=g, progress=progress)


def default_sag_layer(net) -> str:
    """The mid-block self-attention (the UNet's 'mid.1.attn', the U-ViT's 'mid_block.attn')."""
    layers = list_attention_layers(net)
    mid = [name for name in layers if name.startswith("mid")]
    if not mid:
        raise ValueError(f"no mid-block attention layer to guide with: pass sag_layer, one of {layers}")
    return mid[0]


def _one_hot(clusters: torch.Tensor, k: int, device) -> torch.Tensor:
    clusters = torch.as_tensor(clusters).long()
    if int(clusters.min()) < 0 or int(clusters.max()) >= k:
        raise ValueError(f"cluster ids must be in [0, {k}); got {clusters.tolist()}")
    return torch.nn.functional.one_hot(clusters, k).float().to(device)


def _uncond(net):
    return lambda x, t: net(x, t)


def grid_clusters(gen: Generator, rows: int) -> list[int]:
    """The clusters shown as grid rows: all of them, or the most frequent ``rows``."""
    if gen.counts is None:
        return list(range(min(rows, gen.k)))
    order = torch.argsort(gen.counts, descending=True, stable=True)
    return sorted(order[:rows].tolist())


def cluster_grid(gen: Generator, clusters: list[int], per_row: int, **kw) -> torch.Tensor:
    """uint8 (len(clusters) * per_row, C, H, W), row r = samples of clusters[r] (latents decoded)."""
    ids = torch.tensor(clusters).repeat_interleave(per_row) if gen.k else None
    n = len(ids) if ids is not None else len(clusters) * per_row
    return to_images(sample(gen, ids, n, **kw), gen.cfg.data)
