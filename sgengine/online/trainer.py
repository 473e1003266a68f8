"""OnlineTrainer: flow matching on a U-ViT with online self-guidance (SPEC section 2, Algorithm 1).

Two stages over N = cfg.steps: the first sigma N steps (sigma = online.stage_switch) train
unconditionally (the learned null token for every sample); at step sigma N the EMA network is
copied from the live one, and from then on each image is conditioned on the vector of its argmax
prototype m* (eq. 16, computed by the EMA network on x noised to the feature time t_s), dropped
with p_drop to the null token. L = L_fm + min(iter / (sigma N), 1) L_SK (Algorithm 1 line 18).

L_SK reads the live network's mid-block features of the samples whose flow time lies in the
window, in a separate no-grad forward with the null condition (the paper's v^l(x_t, t, 0)): the
stop-gradient of section 4.2 by construction, and the features never see the prototype they are
clustered into. It is added to the flow-matching loss through the base trainer's ``loss_fn``
hook, so optimizer, clipping, EMA, logging and checkpoints stay the base trainer's.

Patch-level variant (online.feature='patches', needs uvit.patch_cond): every mid-block patch
token is clustered, and each patch token gets its prototype's embedding (y_patch), with y = 0 on
the condition token.

Several ranks (torchrun, torch DDP): the network's gradients are averaged by DDP; L_SK is computed
on the features of all ranks (gathered, see ``OnlineClustering.loss``), so phi and M get the same
gradient on every rank and stay identical; prototype usage is summed over ranks. DeepSpeed is not
supported here (check_online_config).

Checkpoints: the base folder plus ``clustering.safetensors`` (head, prototypes, BN statistics;
written inside the folder before its atomic rename) and ``meta.json["online"]`` with
the prototype usage counts of stage 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.latents import to_images
from ..eval.cluster import cluster_report
from ..sampling import Generator, generator_at, sample
from ..common import ranks
from ..checkpoint import load_meta, resolve_checkpoint
from ..training.distributed import shard_slice
from ..training.trainer import Trainer
from ..viz import plot_bars, save_grid
from .clustering import (CLUSTERING_FILE, OnlineClustering, load_clustering, prototype_cond, prototype_ids,
                         save_clustering, sk_weight)

HELD_OUT = 256  # images of the fixed batch on which usage / NMI are logged


def check_online_config(cfg) -> None:
    """The online trainer needs online settings switched on."""
    if not cfg.online.enabled:
        raise ValueError("OnlineTrainer needs --online.enabled true (or --preset uvit-tiny-online)")
    # the rest (arch, objective, condition, DeepSpeed, patch features): config.check_runnable, in the trainer


@dataclass
class OnlineGenerator:
    """A model ready to sample by prototype: the base Generator plus the clustering (phi, M)."""
    gen: Generator
    clustering: OnlineClustering
    usage: torch.Tensor  # stage-2 assignment counts per prototype (K,)


def load_online(path, device="cpu") -> OnlineGenerator:
    """A run folder or checkpoint of an online run: EMA network, clustering and usage."""
    return online_at(resolve_checkpoint(path), device)


def online_at(ckpt, device="cpu") -> OnlineGenerator:
    """``load_online`` of a step folder already resolved (and so verified) by ``resolve_checkpoint``."""
    gen = generator_at(ckpt, device)
    if not gen.cfg.online.enabled:
        raise ValueError(f"{ckpt} is not an online self-guidance run; sample it with sgengine.sample")
    clustering = load_clustering(ckpt, OnlineClustering(gen.cfg.uvit.dim, gen.cfg.online)).to(device).eval()
    usage = torch.tensor(load_meta(ckpt)["online"]["usage"], dtype=torch.long)
    return OnlineGenerator(gen, clustering, usage)


def prototype_condition(gen: OnlineGenerator, ids) -> dict:
    """The condition keywords for prototype ids: (n,) ids, or for a patch-level model also (n, N)
    per-patch ids (an exemplar's map); (n,) ids of a patch-level model put that prototype on
    every patch. Image level: {"y": (n, d)}; patch level: {"y": 0, "y_patch": (n, N, d)}."""
    ids = torch.as_tensor(ids).long()
    k, patches = gen.clustering.cfg.prototypes, gen.clustering.cfg.feature == "patches"
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= k:
        raise ValueError(f"prototype ids must lie in [0, {k}); got {ids.tolist()}")
    if ids.dim() not in ((1, 2) if patches else (1,)):
        raise ValueError(f"prototype ids must be (n,){' or (n, patches)' if patches else ''}, got {tuple(ids.shape)}")
    if patches and ids.dim() == 1:
        ids = ids[:, None].expand(-1, gen.gen.cfg.uvit.num_patches)
    return prototype_cond(gen.clustering, ids, gen.gen.device)


def prototype_of_exemplar(src, image: torch.Tensor, seed: int = 0) -> int | torch.Tensor:
    """The prototype of an exemplar image (C, H, W), uint8 or floats in [-1, 1]: noise it to
    the feature time, one forward of the EMA network, argmax prototype (paper section 4.2).
    An int; for a patch-level model the (N,) map of patch prototypes (paper Fig. 6)."""
    gen = src.online_generator() if isinstance(src, OnlineTrainer) else src
    x = image.float() / 127.5 - 1 if image.dtype == torch.uint8 else image.float()
    m = gen.gen.cfg.uvit
    if x.shape != (m.in_channels, m.img_size, m.img_size):
        raise ValueError(f"the exemplar must be ({m.in_channels}, {m.img_size}, {m.img_size}) like the training "
                         f"images, got {tuple(x.shape)}: resize it first (sgengine.data.load_folder does)")
    g = torch.Generator(gen.gen.device).manual_seed(seed)
    ids = prototype_ids(gen.gen.net, gen.clustering, x[None].to(gen.gen.device), g)[0]
    return int(ids) if ids.dim() == 0 else ids


def top_prototypes(gen: OnlineGenerator, rows: int) -> list[int]:
    """The ``rows`` most used prototypes (ties and an unused model: lowest ids), sorted."""
    order = torch.argsort(gen.usage, descending=True, stable=True)
    return sorted(order[:rows].tolist())


def sample_prototypes(gen: OnlineGenerator, ids, w: float = 1.4, steps: int = 50, sampler: str | None = None,
                      seed: int = 0, progress: bool = False, **guidance) -> torch.Tensor:
    """Samples (n, C, H, W) in [-1, 1] conditioned on prototype ids. CFG's w = 1 + g of eq. 17
    (v_c + g (v_c - v_u) = v_u + (1 + g)(v_c - v_u)): the paper's g = 0.4 is w = 1.4. ``guidance``:
    the SAG keywords of ``sgengine.sampling.sample`` (sag_scale, sag_layer, ...), through the same
    guidance stack as every other checkpoint."""
    return sample(gen.gen, cond=prototype_condition(gen, ids), w=w, steps=steps, sampler=sampler, seed=seed,
                  progress=progress, **guidance)


class _Capture:
    """The network as the flow loss calls it, keeping the (x_t, t) of the training draw."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x_t, t, **cond):
        self.x_t, self.t = x_t, t
        return self.net(x_t, t, **cond)


class OnlineTrainer(Trainer):
    ddp_find_unused = True  # stage 1 trains without conditions: the condition projection is idle

    def __init__(self, cfg, log=print):
        check_online_config(cfg)
        super().__init__(cfg, log)
        self.held = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(cfg.seed))[:HELD_OUT]

    def _build(self) -> None:
        super()._build()
        cfg = self.cfg
        self.clustering = OnlineClustering(cfg.uvit.dim, cfg.online).to(self.device)
        # phi and M join the optimizer (Algorithm 1 line 19); the schedule is rebuilt to cover them.
        self.engine.add_params(self.clustering.parameters())
        self.loss_fn = self._loss
        self.switch_step = int(round(cfg.online.stage_switch * cfg.steps))
        self.usage = torch.zeros(cfg.online.prototypes, dtype=torch.long)
        self.sk_window: list[torch.Tensor] = []

    def _resume(self):
        ckpt = super()._resume()
        if ckpt is not None:
            load_clustering(ckpt, self.clustering)
            saved = load_meta(ckpt)["online"]
            # A resumed run may change --steps: the stage switch stays where the run started it.
            self.usage, self.switch_step = torch.tensor(saved["usage"], dtype=torch.long), saved["switch_step"]
        return ckpt

    # -- one step ---------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return 1 if self.step < self.switch_step else 2

    def _draw(self) -> None:
        """The base draws, then in stage 2 the global batch's condition drops (p_drop), from the
        same generator in the same call: identical on every rank, and no draw lands between the
        loader's look-ahead at the next step's indices and that step (every batch prefetched)."""
        super()._draw()
        drop = torch.rand(self.global_batch, generator=self.g) < self.cfg.online.p_drop
        self._drops = drop if self.stage == 2 else None

    def batch(self, micro: int = 0):
        x, _ = super().batch(micro)  # base draws (indices, its dropout, flips); condition 'none': no cond
        if self.stage == 1:
            return x, {}  # y=None: the learned null token for every sample
        if self.step == self.switch_step and micro == 0:
            self.ema.load_state_dict(self.net.state_dict())  # the switch: EMA restarts from the live net
        ids = prototype_ids(self.ema, self.clustering, x, self.g_dev)
        self.usage += ranks.sum_over_ranks(torch.bincount(ids.reshape(-1), minlength=self.usage.numel())).cpu()
        drop = self._drops[shard_slice(self.cfg.batch_size, micro, self.dist)]
        return x, {**prototype_cond(self.clustering, ids, self.device), "null": drop.to(self.device)}

    def _loss(self, net, x, generator=None, **cond) -> torch.Tensor:
        """Per-sample L_fm + w(iter) L_SK (the scalar L_SK broadcast, so the mean is L_fm + w L_SK)."""
        cap = _Capture(net)
        fm = self.objective.loss(cap, x, generator=generator, **cond)
        sk = self.sk_loss(net, cap.x_t, cap.t)
        self.sk_window.append(sk.detach())  # read at log points: no host sync per step
        return fm + self.sk_w() * sk

    def sk_w(self) -> float:
        """Algorithm 1's min(iter / (sigma N), 1), with sigma N = the switch step (kept on resume)."""
        return sk_weight(self.step, self.switch_step, 1.0)

    def sk_loss(self, net, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_SK on the in-window samples' stop-gradient (no-grad, null-condition) features, over
        the rows of every rank (``OnlineClustering.loss`` gathers them)."""
        keep = self.clustering.in_window(t)
        feats = x_t.new_zeros(0, self.cfg.uvit.dim)  # a rank with no in-window sample still joins the gather
        if bool(keep.any()):
            # Under DDP the raw network: a no-grad forward that not every rank runs must not sync.
            fwd = self.net if self.dist.world > 1 else net
            with torch.no_grad():
                _, feats = fwd(x_t[keep], t[keep], return_features=True)
        return self.clustering.loss(feats, t[keep])

    def train_step(self) -> float:
        loss = super().train_step()
        self.clustering.normalize_prototypes_()  # M re-normalised every step (SwAV)
        return loss

    # -- logs, checkpoints, grids -----------------------------------------------------------
    def _log(self, t0, bar):
        now = super()._log(t0, bar)
        sk = float(torch.stack(self.sk_window).mean()) if self.sk_window else 0.0
        self.sk_window = []
        done = 1 if self.step <= self.switch_step else 2  # the stage of the steps just logged
        rec = {"step": self.step, "stage": done, "sk_loss": sk,
               "sk_weight": self.sk_w()}
        if self.metrics is not None:
            self.metrics.log({**rec, **self.cluster_metrics(self.ema if done == 2 else self.net)})
        return now

    def cluster_metrics(self, net) -> dict:
        """Usage (prototypes used, KL to uniform, images per prototype) and NMI to labels of ``net``'s
        held-batch assignments; the usage histogram also goes to ``cluster_usage.png`` (sorted, so a
        collapse shows as one tall bar) and to TensorBoard."""
        x = self.data.batch(self.held, self.device)  # a posterior pack's means: the same images every log
        ids = prototype_ids(net, self.clustering, x, torch.Generator(self.device).manual_seed(self.cfg.seed))
        labels = self.data.labels[self.held] if self.data.labels is not None and ids.dim() == 1 else None
        ids = ids.cpu().reshape(-1)
        rep = cluster_report(ids, self.cfg.online.prototypes, labels)  # patches: balance only
        counts = torch.bincount(ids, minlength=self.cfg.online.prototypes)
        plot_bars(counts.sort(descending=True).values, self.out / "cluster_usage.png",
                  f"held-out images per prototype at step {self.step} (sorted)")
        if self.metrics is not None:
            self.metrics.histogram("cluster_ids", ids, self.step)
        return {**{f"cluster_{k}": v for k, v in rep.items() if k != "k"}, "cluster_counts": counts.tolist()}

    def _meta(self) -> dict:
        return {**super()._meta(), "online": {"clustering": CLUSTERING_FILE, "usage": self.usage.tolist(),
                                              "switch_step": self.switch_step}}

    def _extra_files(self, folder: Path, stage: Path | None) -> None:
        super()._extra_files(folder, stage)
        save_clustering(folder, self.clustering)  # inside the checkpoint's atomic rename

    def online_generator(self) -> OnlineGenerator:
        return OnlineGenerator(self.generator(), self.clustering, self.usage.clone())

    def sample_grid(self) -> Path:
        """Rows = the most used prototypes (stage-2 usage; before it, the first ones)."""
        cfg, gen = self.cfg, self.online_generator()
        rows = top_prototypes(gen, cfg.grid_rows)
        ids = torch.tensor(rows).repeat_interleave(cfg.grid_cols)
        imgs = to_images(sample_prototypes(gen, ids, w=cfg.guidance_w, steps=cfg.sample_steps,
                                           sampler=cfg.sampler or None, seed=cfg.seed), cfg.data)
        path = save_grid(imgs, len(rows), self.out / "samples" / f"step_{self.step:08d}.png", scale=2)
        save_grid(imgs, len(rows), self.out / "samples.png", scale=2)
        return path
