"""The lean single-process trainer: eps-prediction DDPM with classifier-free guidance.

One loop: sample a batch, drop conditions with p_uncond, L_simple, AdamW with warmup,
gradient clipping, EMA; logs, sample grids (rows = clusters) and atomic checkpoints.
Every source of randomness is a seeded generator saved in the checkpoint, so a killed
run resumed with ``--resume`` reaches the same weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..annotate.io import Annotations, load_annotations, save_annotations
from ..annotate.pixels import pixel_features
from ..config import TrainConfig, check_runnable, from_dict, to_dict
from ..data import ImageData, load_data, report_skipped
from ..sampling import Generator, cluster_grid, grid_clusters
from ..viz import save_grid
from .checkpoint import latest_checkpoint, load_meta, load_state, load_weights, save_checkpoint
from .ema import ema_decay, ema_update
from .logger import MetricsLogger
from .objectives import build_network, make_objective

# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"steps", "resume", "out", "log_every", "sample_every", "ckpt_every", "device",
                     "keep_checkpoints", "grid_rows", "grid_cols", "sample_steps", "guidance_w", "sampler",
                     "eval_every", "eval_n", "compile", "channels_last"}


class NonFiniteLoss(FloatingPointError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_conditions(cfg: TrainConfig, data: ImageData, out: Path, log=print) -> Annotations | None:
    """The guidance signal for every training image, per ``cfg.condition``."""
    if cfg.condition == "none":
        return None
    if cfg.condition == "labels":
        if data.labels is None:
            raise ValueError(f"condition='labels' but {cfg.data} has no labels (class sub-folders or 'y' in the .npz)")
        return Annotations(data.labels, int(data.labels.max()) + 1, settings={"method": "ground-truth labels"})
    if cfg.condition == "annotations":
        return load_annotations(cfg.annotations)
    return _self_labels(cfg, data, out / "annotations.safetensors", log)


def _self_labels(cfg: TrainConfig, data: ImageData, path: Path, log) -> Annotations:
    if path.exists():
        return load_annotations(path)
    from ..annotate.labels import label_annotations  # k-means loads only when self-labelling

    feats = pixel_features(data.images, cfg.pca_dim or None)
    settings = {"method": "labels", "features": f"pca{cfg.pca_dim}" if cfg.pca_dim else "pixels",
                "data": cfg.data, "n": len(data)}
    ann = label_annotations(feats, cfg.k, settings, niter=30, seed=cfg.seed)
    save_annotations(path, ann)
    log(f"self-labels: k-means (K={cfg.k}) on {settings['features']} of {len(data)} images -> {path}")
    return ann


def resolve_model(cfg: TrainConfig, ann: Annotations | None, data: ImageData) -> TrainConfig:
    """Fill in the network's condition size K (and layout channels) from the annotations."""
    channels = cfg.uvit.in_channels if cfg.arch == "uvit" else cfg.model.in_channels
    if data.images.shape[1] != channels:
        raise ValueError(f"data has {data.images.shape[1]} channels but the model expects {channels}: "
                         f"pass --{'uvit' if cfg.arch == 'uvit' else 'model'}.in_channels {data.images.shape[1]}")
    k = ann.k if ann is not None else 0
    lay = ann.layout.shape[1] if ann is not None and ann.layout is not None else 0
    if cfg.arch == "uvit":
        if lay:
            raise ValueError("the U-ViT takes no spatial layout; train box/mask guidance with --arch unet")
        return dataclasses.replace(cfg, uvit=dataclasses.replace(cfg.uvit, cond_dim=k or None))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k, layout_channels=lay))


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        check_runnable(cfg)
        self.log, self.out, self.device = log, Path(cfg.out), pick_device(cfg.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = load_data(cfg.data, cfg.model.img_size, cfg.model.in_channels)
        report_skipped(self.data, log)
        self.ann = build_conditions(cfg, self.data, self.out, log)
        if self.ann is not None and len(self.ann) != len(self.data):
            raise ValueError(f"annotation file has {len(self.ann)} entries but {cfg.data} has {len(self.data)} images; "
                             "annotate this exact data with `python -m sgengine.annotate`")
        self.cfg = resolve_model(cfg, self.ann, self.data)
        self._build()
        self.resumed_from = self._resume() if cfg.resume else self._fresh()
        self.metrics = MetricsLogger(self.out, self.step if self.resumed_from else None)

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.objective = make_objective(cfg)
        self.net = self.objective.wrap(build_network(cfg)).to(self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
        self.loss_fn = self.objective.loss
        self.step = 0
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.g_dev = torch.Generator(self.device).manual_seed(cfg.seed + 1)

    def _fresh(self) -> None:
        if latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it, "
                                  "or choose another --out")
        return None

    def _resume(self) -> Path | None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"--resume: no checkpoint in {self.out} yet; starting from step 0")
            return None
        self._check_same_run(load_meta(ckpt)["config"])
        self.net.load_state_dict(load_weights(ckpt, "model"))
        self.ema.load_state_dict(load_weights(ckpt, "ema"))
        st = load_state(ckpt)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.step = st["step"]
        self.g.set_state(st["rng_cpu"])
        self.g_dev.set_state(st["rng_dev"])
        torch.set_rng_state(st["rng_torch"])
        self.log(f"resumed from {ckpt} at step {self.step}")
        return ckpt

    def _check_same_run(self, saved: dict) -> None:
        now, saved = to_dict(self.cfg), to_dict(from_dict(saved))  # JSON turned tuples into lists
        diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if diff:
            raise ValueError(f"--resume with a different configuration ({', '.join(diff)} changed); "
                             "use the original settings or a new --out")

    # -- one step -------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, dict]:
        cfg, b = self.cfg, self.cfg.batch_size
        idx = torch.randint(len(self.data), (b,), generator=self.g)
        null = torch.rand(b, generator=self.g) < cfg.p_uncond  # CFG training: drop y and layout together
        flip = (torch.rand(b, generator=self.g) < 0.5) if cfg.hflip else None
        x = self._flip(self.data.batch(idx, self.device), flip)
        if self.ann is None:
            return x, {}
        cond = {"y": self.ann.vector(idx).to(self.device), "null": null.to(self.device)}
        if self.ann.layout is not None:
            cond["layout"] = self._flip(self.ann.layout[idx].to(self.device).float(), flip)
        return x, cond

    def _flip(self, x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        if flip is None:
            return x
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)

    def train_step(self) -> float:
        x, cond = self.batch()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
            loss = self.loss_fn(self.net, x, generator=self.g_dev, **cond).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(self._nan_message(float(loss.detach())))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.net, ema_decay(self.step, self.cfg.ema_max))
        self.step += 1
        return float(loss.detach())

    def _bf16(self) -> bool:
        return self.cfg.bf16 and self.device.type == "cuda"

    def _nan_message(self, value: float) -> str:
        last = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"loss became {value} at step {self.step + 1}; {where}. Lower --lr, keep --grad_clip > 0 "
                "or check the data for NaN, then continue with --resume.")

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t0, window = self.cfg, time.perf_counter(), []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                window.append(self.train_step())
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    t0 = self._log(window, t0, bar)
                    window = []
                self._periodic()
        except KeyboardInterrupt:
            self.log(f"interrupted at step {self.step}; checkpoint: {self.checkpoint()}")
            raise
        finally:
            bar.close()
        return self.finish()

    def _log(self, window: list[float], t0: float, bar) -> float:
        now = time.perf_counter()
        rec = {"step": self.step, "loss": sum(window) / len(window), "lr": self.sched.get_last_lr()[0],
               "img_per_s": len(window) * self.cfg.batch_size / max(now - t0, 1e-9)}
        self.metrics.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        return now

    def _periodic(self) -> None:
        cfg = self.cfg
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
            self.checkpoint()
        if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
            self.sample_grid()

    def checkpoint(self) -> Path:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "step": self.step,
                 "rng_cpu": self.g.get_state(), "rng_dev": self.g_dev.get_state(), "rng_torch": torch.get_rng_state()}
        path = save_checkpoint(self.out, self.step, self.net, self.ema, state, self._meta(), self.cfg.keep_checkpoints)
        self.metrics.plot(self.out / "loss.png")
        return path

    def _meta(self) -> dict:
        counts = self.ann.counts().tolist() if self.ann is not None else None
        settings = self.ann.settings if self.ann is not None else {}
        return {"config": to_dict(self.cfg), "step": self.step, "cluster_counts": counts, "annotations": settings}

    def generator(self) -> Generator:
        counts = self.ann.counts() if self.ann is not None else None
        return Generator(self.ema, self.cfg, counts, self.objective)

    def sample_grid(self) -> Path:
        cfg, gen = self.cfg, self.generator()
        rows = grid_clusters(gen, cfg.grid_rows) if gen.k else list(range(cfg.grid_rows))
        imgs = cluster_grid(gen, rows, cfg.grid_cols, w=cfg.guidance_w, steps=cfg.sample_steps,
                            sampler=cfg.sampler or None, seed=cfg.seed)
        path = save_grid(imgs, len(rows), self.out / "samples" / f"step_{self.step:08d}.png", scale=2)
        save_grid(imgs, len(rows), self.out / "samples.png", scale=2)
        return path

    def finish(self) -> dict:
        ckpt = self.checkpoint()
        grid = self.sample_grid()
        self.metrics.close()
        return {"checkpoint": ckpt, "grid": grid, "latest_grid": self.out / "samples.png",
                "metrics": self.metrics.path, "curve": self.out / "loss.png"}
