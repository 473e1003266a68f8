"""The trainer: eps-prediction DDPM (or EDM / flow) with classifier-free guidance.

One loop: sample a batch, drop conditions with p_uncond, the objective's loss, AdamW with
warmup, gradient clipping, EMA; logs, sample grids (rows = clusters) and atomic checkpoints.
Every source of randomness is a seeded generator saved in the checkpoint (or derived from
the step), so a killed run resumed with ``--resume`` reaches the same weights as an
uninterrupted one.

Scale-out (see distributed.py for the global batch and the sharding): one process is the
plain loop; under torchrun it is torch DDP; with ``--deepspeed true`` a DeepSpeed engine
(ZeRO 0-3, ds.py) replaces model and optimizer, alone or under torchrun. Only rank 0
writes files. Throughput: bf16 autocast and fused AdamW on CUDA, channels_last,
torch.compile with an eager fallback, the uint8 data set kept on the GPU when it fits.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..annotate.io import Annotations, load_annotations, save_annotations
from ..annotate.pixels import pixel_features
from ..config import TrainConfig, check_runnable, from_dict, to_dict
from ..data import BatchLoader, ImageData, load_data, report_skipped
from ..device import resolve_device
from ..sampling import Generator, cluster_grid, grid_clusters
from ..viz import save_grid
from . import distributed as D, ds  # imports no DeepSpeed until a run asks for it
from .checkpoint import latest_checkpoint, load_meta, load_state, load_weights, save_checkpoint
from .ema import ema_decay, ema_update
from .logger import MetricsLogger
from .objectives import build_network, make_objective

# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"steps", "resume", "out", "log_every", "sample_every", "ckpt_every", "device",
                     "keep_checkpoints", "grid_rows", "grid_cols", "sample_steps", "guidance_w", "sampler",
                     "eval_every", "eval_n", "eval_ref", "eval_features", "compile", "compile_mode",
                     "channels_last"}
DATA_ON_GPU_FRACTION = 0.25  # keep the uint8 data set on the GPU when it takes at most this much free memory



class NonFiniteLoss(FloatingPointError):
    pass


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


class CompileOrEager:
    """torch.compile(module) that falls back to eager (warning once) when compiling fails.

    Compilation happens at the first call, so only that call's failure means "cannot
    compile"; later errors are real and propagate.
    """

    def __init__(self, module: torch.nn.Module, log=print, mode: str = "default"):
        self.module, self.log, self.first = module, log, True
        self.fn = torch.compile(module, mode=mode)

    def __call__(self, *args, **kwargs):
        if not self.first:
            return self.fn(*args, **kwargs)
        self.first = False
        try:
            return self.fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); training eagerly", stacklevel=2)
            self.fn = self.module
            return self.fn(*args, **kwargs)


class Trainer:
    ddp_find_unused = False  # every parameter takes part in every step

    def __init__(self, cfg: TrainConfig, log=print):
        check_runnable(cfg)
        if cfg.deepspeed and cfg.channels_last:
            raise ValueError(ds.CHANNELS_LAST_WITH_DS)
        self.dist = D.dist_info()
        self.log = log if self.dist.main else (lambda *a, **k: None)
        self.out, self.device = Path(cfg.out), D.local_device(resolve_device(cfg.device), self.dist)
        D.setup(self.device, self.dist, need_group=cfg.deepspeed)
        self.out.mkdir(parents=True, exist_ok=True)
        net_cfg = cfg.uvit if cfg.arch == "uvit" else cfg.model  # the network fixes size and channels
        self.data = load_data(cfg.data, net_cfg.img_size, net_cfg.in_channels, self.dist.main, cfg.data_resize)
        report_skipped(self.data, self.log)
        self.ann = self._conditions(cfg)
        if self.ann is not None and len(self.ann) != len(self.data):
            raise ValueError(f"annotation file has {len(self.ann)} entries but {cfg.data} has {len(self.data)} images; "
                             "annotate this exact data with `python -m sgengine.annotate`")
        self.cfg = resolve_model(cfg, self.ann, self.data)
        self._data_to_device()
        self.loader = BatchLoader(self.data, self.device)  # packs: gathered from the map in the background
        self._build()
        self.resumed_from = self._resume() if cfg.resume else self._fresh()
        self.metrics = MetricsLogger(self.out, self.step if self.resumed_from else None) if self.dist.main else None

    def _conditions(self, cfg: TrainConfig) -> Annotations | None:
        """Rank 0 computes (and caches) self-labels first; the others then read its file."""
        if not self.dist.main:
            D.barrier()
        ann = build_conditions(cfg, self.data, self.out, self.log)
        if self.dist.main:
            D.barrier()
        return ann

    def _data_to_device(self) -> None:
        """uint8 images on the GPU when they fit: batches are then gathered without host copies."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        imgs = self.data.images
        if imgs.numel() * imgs.element_size() <= DATA_ON_GPU_FRACTION * free:
            self.data.images = imgs.to(self.device)

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        """Floats on the device (uint8 scaled to [-1, 1]), gathered by sgengine.data.BatchLoader."""
        return self.loader.get(idx)

    def _prefetch(self) -> None:
        """Hand this rank's next shards to the loader: the rest of this step's micro-batches and the
        next step's first, whose indices come from a peek at (a copy of) the index generator."""
        b, accum, n = self.cfg.batch_size, self.cfg.grad_accum, len(self.data)
        peek = torch.Generator().set_state(self.g.get_state())
        upcoming = torch.randint(n, (self.global_batch,), generator=peek)  # _draw's first draw
        shards = [self._draws[0][D.shard_slice(b, m, self.dist)] for m in range(1, accum)]
        self.loader.prefetch(shards + [upcoming[D.shard_slice(b, 0, self.dist)]])

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.objective = make_objective(cfg)
        self.net = self.objective.wrap(build_network(cfg)).to(self.device)
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.engine = self.opt = self.sched = None
        if cfg.deepspeed:
            self.engine = ds.initialize(self.net, cfg, self.device, self._warmup)
            self.opt, self.sched, self.fwd = self.engine.optimizer, self.engine.lr_scheduler, self.engine
        else:
            fused = self.device.type == "cuda"
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._warmup)
            self.fwd = D.wrap_ddp(self.net, self.device, self.ddp_find_unused) if self.dist.world > 1 else self.net
        self._compile()
        self.loss_fn = self.objective.loss
        self.step = 0
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.g_dev = torch.Generator(self.device).manual_seed(cfg.seed + 1)

    def _warmup(self, s: int) -> float:
        return min(1.0, (s + 1) / max(self.cfg.warmup, 1))

    def _compile(self) -> None:
        if not self.cfg.compile:
            return
        if self.engine is not None:  # ZeRO's parameter hooks do not survive tracing reliably
            warnings.warn("--compile is ignored under --deepspeed; training eagerly", stacklevel=2)
            return
        self.fwd = CompileOrEager(self.fwd, self.log, self.cfg.compile_mode)

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
        self.ema.load_state_dict(load_weights(ckpt, "ema"))
        st = load_state(ckpt)
        if self.engine is not None:
            ds.load_engine(self.engine, ckpt)  # module, optimizer and scheduler, sharded per rank
        else:
            self.net.load_state_dict(load_weights(ckpt, "model"))
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
    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks and micro-steps (distributed.py)."""
        return self.cfg.batch_size * self.dist.world * self.cfg.grad_accum

    def _draw(self) -> None:
        """The whole global batch's indices, CFG drops and flips: identical on every rank."""
        n = self.global_batch
        idx = torch.randint(len(self.data), (n,), generator=self.g)
        null = torch.rand(n, generator=self.g) < self.cfg.p_uncond  # CFG training: drop y and layout together
        flip = (torch.rand(n, generator=self.g) < 0.5) if self.cfg.hflip else None
        self._draws = (idx, null, flip)

    def batch(self, micro: int = 0) -> tuple[torch.Tensor, dict]:
        """This rank's shard of micro-step ``micro``; micro-step 0 draws the next global batch."""
        if micro == 0:
            self._draw()
            self._prefetch()
        rows = D.shard_slice(self.cfg.batch_size, micro, self.dist)
        idx, null, flip = (None if t is None else t[rows] for t in self._draws)
        x = self._flip(self._images(idx), flip)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.ann is None:
            return x, {}
        cond = {"y": self.ann.vector(idx).to(self.device, non_blocking=True), "null": null.to(self.device)}
        if self.ann.layout is not None:
            cond["layout"] = self._flip(self.ann.layout[idx].to(self.device).float(), flip)
        return x, cond

    def _flip(self, x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        if flip is None:
            return x
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)

    def train_step(self) -> float:
        accum, total = self.cfg.grad_accum, 0.0
        if self.engine is None:
            self.opt.zero_grad(set_to_none=True)
        for micro in range(accum):
            self.g_dev.manual_seed(D.shard_seed(self.cfg.seed, self.step, micro, self.dist))
            x, cond = self.batch(micro)
            with D.accumulating(self.fwd_module, micro, accum):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
                    loss = self.loss_fn(self.fwd, x, generator=self.g_dev, **cond).mean()
                value = D.mean_over_ranks(loss.detach())  # global: every rank stops together, none hangs
                if not math.isfinite(value):
                    raise NonFiniteLoss(self._nan_message(value))
                self._backward(loss)
            total += value
        self._optimizer_step()
        self._update_ema()
        self.step += 1
        return total / accum

    @property
    def fwd_module(self):
        """What the loss calls, unwrapped from the compile fallback (DDP's no_sync lives there)."""
        return self.fwd.module if isinstance(self.fwd, CompileOrEager) else self.fwd

    def _backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:  # DeepSpeed scales by 1/accum and steps at the boundary itself
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.cfg.grad_accum).backward()

    def _optimizer_step(self) -> None:
        if self.engine is not None:
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()

    def _update_ema(self) -> None:
        decay = ema_decay(self.step, self.cfg.ema_max)
        if self.engine is not None:
            ds.update_ema(self.ema, self.engine, decay)
        else:
            ema_update(self.ema, self.net, decay)

    def _bf16(self) -> bool:
        if self.engine is not None:
            return self.engine.bfloat16_enabled()  # bf16 weights need bf16 inputs, on any device
        return self.cfg.bf16 and self.device.type == "cuda"

    def _nan_message(self, value: float) -> str:
        last = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"loss became {value} at step {self.step + 1}; {where}. Lower --lr, keep --grad_clip > 0 "
                "or check the data for NaN, then continue with --resume.")

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t0, window = self.cfg, time.perf_counter(), []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.dist.main)
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
               "img_per_s": len(window) * self.global_batch / max(now - t0, 1e-9)}
        if self.metrics is not None:
            self.metrics.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        return now

    def _periodic(self) -> None:
        cfg = self.cfg
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
            self.checkpoint()
        if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps and self.dist.main:
            self.sample_grid()
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            from ..eval.runner import periodic_eval  # the feature network loads only when evaluating

            periodic_eval(self)

    def checkpoint(self) -> Path:
        """Collective under DeepSpeed (every rank holds a shard); rank 0 writes the folder."""
        state = {"step": self.step, "rng_cpu": self.g.get_state(), "rng_dev": self.g_dev.get_state(),
                 "rng_torch": torch.get_rng_state()}
        model, stage = self.net, None
        if self.engine is not None:
            model, stage = ds.consolidated(self.engine), ds.save_engine(self.engine, self.out, self.step, self.dist)
        else:
            state.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict())
        path = self.out / "ckpt" / f"step_{self.step:08d}"
        if self.dist.main:
            path = save_checkpoint(self.out, self.step, model, self.ema, state, self._meta(),
                                   self.cfg.keep_checkpoints, extra=lambda tmp: self._extra_files(tmp, stage))
            self.metrics.plot(self.out / "loss.png")
        D.barrier()
        return path

    def _extra_files(self, folder: Path, stage: Path | None) -> None:
        """Files written inside the checkpoint before its atomic rename; subclasses add theirs."""
        if stage is not None:
            ds.adopt(stage, folder)

    def _meta(self) -> dict:
        counts = self.ann.counts().tolist() if self.ann is not None else None
        settings = self.ann.settings if self.ann is not None else {}
        return {"config": to_dict(self.cfg), "step": self.step, "cluster_counts": counts, "annotations": settings,
                "world": self.dist.world, "global_batch": self.global_batch}

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
        grid = self.sample_grid() if self.dist.main else self.out / "samples.png"
        if self.metrics is not None:
            self.metrics.close()
        D.barrier()
        return {"checkpoint": ckpt, "grid": grid, "latest_grid": self.out / "samples.png",
                "metrics": self.out / "metrics.jsonl", "curve": self.out / "loss.png"}
