"""Sampling API: a model ready to sample (``Generator``) and ``sample`` under CFG / SAG with any sampler.

``load_generator(run)`` reads a checkpoint written by ``sgengine.train``; ``Generator.of(net, param,
shape, num_classes)`` wraps an outside network (a diffusers UNet in ``DiffusersDenoiser``, or any
``net(x_t, t, y=None, null=None)``) with no TrainConfig.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_into, load_meta, resolve_checkpoint
from .config import TrainConfig, from_dict
from .diffusion.objectives import Objective, build_network, make_objective, run_sampler
from .diffusion.param import Parameterization, parameterization_for
from .data.latents import to_images
from .guidance.adapters import adapter_for
from .guidance.cfg import CFG
from .guidance.sag import SAG


@dataclass
class Generator:
    """A model ready to sample: native (objective-wrapped) network, its objective, cluster frequencies.

    ``cfg`` is the training config of a checkpoint (None for an outside model, which then gives
    ``shape`` (C, H, W) and ``num_classes``); ``class_ids`` passes the condition as integer ids
    (a diffusers class-conditional UNet) instead of one-hot vectors (the engine's networks).
    """
    net: torch.nn.Module
    cfg: TrainConfig | None
    counts: torch.Tensor | None  # empirical cluster counts of the training set (K,)
    objective: Objective
    shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    class_ids: bool = False

    @classmethod
    def of(cls, net, param: Parameterization | str, shape, num_classes: int = 0, *, class_ids: bool = True,
           sampler: str = "ddim", clip_x0: bool = False, counts: torch.Tensor | None = None) -> "Generator":
        """An outside network ``net(x_t, t, y=None, null=None)`` predicting ``param`` ('ddpm' / 'v' /
        'edm' / 'flow' or a Parameterization, e.g. ``eps_param(scheduler.alphas_cumprod)``)."""
        param = parameterization_for(param) if isinstance(param, str) else param
        if len(tuple(shape)) != 3:
            raise ValueError(f"shape must be (channels, height, width), got {shape}")
        obj = Objective(param.name, None, lambda n: n, param, sampler, clip_x0)
        return cls(net, None, counts, obj, tuple(int(v) for v in shape), int(num_classes), class_ids)

    @property
    def k(self) -> int:
        """Number of classes / size of the condition vector (0: unconditional)."""
        if self.num_classes is not None:
            return self.num_classes
        if self.cfg.arch == "uvit":
            return self.cfg.uvit.cond_dim or 0
        return self.cfg.model.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.shape is not None:
            return self.shape
        m = self.cfg.uvit if self.cfg.arch == "uvit" else self.cfg.model
        return (m.in_channels, m.img_size, m.img_size)

    @property
    def param(self) -> Parameterization:
        return self.objective.param

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "ema") -> Generator:
    """Load a run folder or checkpoint folder written by ``sgengine.train``."""
    return generator_at(resolve_checkpoint(path), device, which)


def generator_at(ckpt: Path, device: str | torch.device = "cpu", which: str = "ema") -> Generator:
    """The generator of a step folder that ``resolve_checkpoint`` returned: it has checked every file's
    checksum once, so this does not read the weights a second time for that."""
    meta = load_meta(ckpt)
    cfg = from_dict(meta["config"])
    obj = make_objective(cfg)
    net = obj.wrap(build_network(cfg))
    load_into(net, ckpt, which)  # another network's weights: a one-line error, not a size-mismatch trace
    counts = torch.tensor(meta["cluster_counts"]) if meta.get("cluster_counts") else None
    return Generator(net.to(device).eval(), cfg, counts, obj)


def draw_clusters(counts: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n cluster ids drawn from the training set's empirical cluster frequencies."""
    return torch.multinomial(counts.double(), n, replacement=True, generator=generator)


def sample(gen: Generator, clusters: torch.Tensor | None = None, n: int | None = None, *, w: float = 2.0,
           steps: int = 50, sampler: str | None = None, seed: int = 0, layout: torch.Tensor | None = None,
           cond: dict | None = None, progress: bool = False, callback=None, sag_scale: float = 0.0,
           sag_layer: str | None = None, sag_threshold: float = 1.0, sag_blur=(9, 1.0),
           sag_window=None) -> torch.Tensor:
    """Samples as floats in [-1, 1], (n, C, H, W). ``clusters``: ids (n,), or None to draw them.

    ``sampler``: any name of ``sgengine.diffusion.SAMPLERS`` (None: the objective's default), on the
    objective's own grid of ``steps`` steps; ``callback`` as in ``sgengine.diffusion.samplers``.
    ``cond``: condition keywords given directly (e.g. prototype vectors), instead of ``clusters``.
    ``sag_scale`` > 0 adds self-attention guidance (``sgengine.guidance.SAG``) on top of CFG, reading
    ``sag_layer`` (default: the mid-block attention; see ``list_attention_layers``); ``sag_window``
    = (t_lo, t_hi) in the network's own time restricts it to those steps.
    """
    g = torch.Generator().manual_seed(seed)
    if cond is None:
        clusters, cond = _condition(gen, clusters, n, layout, g)
    n = _batch_size(cond, clusters, n)
    x = torch.randn(n, *gen.image_shape, generator=g).to(gen.device)
    with guided(gen, w, cond, sag_scale, sag_layer, sag_threshold, sag_blur, sag_window) as denoise:
        return run_sampler(gen.objective, sampler, denoise, x, steps, generator=g, progress=progress,
                           callback=callback)


def _condition(gen: Generator, clusters, n, layout, g) -> tuple[torch.Tensor | None, dict]:
    """(cluster ids, condition keywords): ids drawn from the training frequencies when not given."""
    if not gen.k:
        return None, {}
    if clusters is None:
        if n is None:
            raise ValueError("pass clusters (ids) or n (the number of samples)")
        clusters = draw_clusters(gen.counts, n, g) if gen.counts is not None else torch.randint(gen.k, (n,), generator=g)
    cond = {"y": _ids(clusters, gen.k, gen.device) if gen.class_ids else _one_hot(clusters, gen.k, gen.device)}
    if layout is not None:
        cond["layout"] = layout.to(gen.device)
    return clusters, cond


def _batch_size(cond: dict, clusters, n) -> int:
    if clusters is not None:
        return len(clusters)
    if cond.get("y") is not None:
        return cond["y"].shape[0]
    if n is None:
        raise ValueError("pass n (the number of samples) for an unconditional model")
    return n


def guided(gen: Generator, w: float, cond: dict, sag_scale: float = 0.0, sag_layer: str | None = None,
           sag_threshold: float = 1.0, sag_blur=(9, 1.0), sag_window=None):
    """A context giving the native ``denoise(x_t, t)``: the network under CFG (when conditioned) and
    SAG (when ``sag_scale`` != 0); the one guidance stack of every checkpoint kind."""
    conditioned = any(v is not None for v in cond.values())
    if sag_scale:
        return SAG(gen.net, gen.param, sag_layer or default_sag_layer(gen.net), sag_scale, sag_threshold,
                   sag_blur, sag_window, w=w if conditioned else None, **cond)
    return contextlib.nullcontext(CFG(gen.net, w, **cond) if conditioned else _uncond(gen.net))


def default_sag_layer(net) -> str:
    """The family's documented default layer (the engine's: the mid-block self-attention, the UNet's
    'mid.1.attn', the U-ViT's 'mid_block.attn'); see ``sgengine.guidance.adapters``."""
    return adapter_for(net).default_layer


def _ids(clusters, k: int, device) -> torch.Tensor:
    clusters = torch.as_tensor(clusters).long()
    if int(clusters.min()) < 0 or int(clusters.max()) >= k:
        raise ValueError(f"cluster ids must be in [0, {k}); got {clusters.tolist()}")
    return clusters.to(device)


def _one_hot(clusters: torch.Tensor, k: int, device) -> torch.Tensor:
    return torch.nn.functional.one_hot(_ids(clusters, k, device), k).float()


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
