"""The trainer: eps-prediction DDPM (or EDM / flow) with classifier-free guidance.

One loop: sample a batch, drop conditions with p_uncond, the objective's loss, AdamW with
warmup, gradient clipping, EMA; logs, sample grids (rows = clusters) and atomic checkpoints.
Every source of randomness is a seeded generator saved in the checkpoint (or derived from
the step), so a killed run resumed with ``--resume`` reaches the same weights as an
uninterrupted one. Ctrl-C is only noted and acted on between whole steps (interrupt.py): the run
writes that step's checkpoint and raises Interrupted. One run per ``--out``: the trainer holds its
run lock (common/runlock.py) on rank 0 from set-up to finish.

Scale-out (see distributed.py for the global batch and the sharding): the loop drives one
engine object (engines.py): plain in one process, torch DDP under torchrun, or DeepSpeed
(ZeRO 0-3, ds.py) with ``--deepspeed true``, alone or under torchrun. Only rank 0 writes
files. The loss stays on the device between log points (no per-step host sync). Throughput: bf16 autocast and fused AdamW on CUDA, channels_last,
torch.compile with an eager fallback, the uint8 data set kept on the GPU when it fits.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..annotate.io import Annotations, load_annotations
from ..checkpoint import latest_checkpoint, load_meta, load_state, load_weights, save_checkpoint, step_folders
from ..common import ranks, runlock
from ..config import TrainConfig, check_runnable, from_dict, to_dict
from ..data import BatchLoader, ImageData, load_data, report_skipped
from ..device import resolve_device
from ..diffusion.objectives import build_network, make_objective
from ..sampling import Generator, cluster_grid, grid_clusters
from ..viz import save_grid
from . import distributed as D, ds  # imports no DeepSpeed until a run asks for it
from .ema import ema_decay
from .engines import LossWatch, make_engine
from .interrupt import Interrupted, StopRequest
from .logger import MetricsLogger
from .resume import apply_optimiser_settings, config_changes, describe_changes, nonfinite_counts, resume_point

SELF_LABELS_FILE = "annotations.safetensors"  # in --out; written by the train CLI (sgengine/train.py)
DATA_ON_GPU_FRACTION = 0.25  # keep the uint8 data set on the GPU when it takes at most this much free memory
POSTERIOR_STREAM = 1  # shard_seed's stream of a latent pack's posterior draws (the objective's noise: 0)



class NonFiniteLoss(FloatingPointError):
    """The loss or the weights became NaN/Inf; the message names the last good checkpoint."""


NAN_ADVICE = "Lower --lr, keep --grad_clip > 0 or check the data for NaN, then continue with --resume"


def build_conditions(cfg: TrainConfig, data: ImageData, out: Path, annotations=None) -> Annotations | None:
    """The guidance signal for every training image, per ``cfg.condition``. Self-labels are read from
    ``annotations`` or ``out/annotations.safetensors``: the train CLI makes that file before training."""
    if cfg.condition == "none":
        return None
    if cfg.condition == "labels":
        if data.labels is None:
            raise ValueError(f"condition='labels' but {cfg.data} has no labels (class sub-folders or 'y' in the .npz)")
        return Annotations(data.labels, int(data.labels.max()) + 1, settings={"method": "ground-truth labels"})
    if cfg.condition == "annotations":
        return load_annotations(cfg.annotations)
    path = Path(annotations or out / SELF_LABELS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"self-labels {path} are not made yet: start training with `python -m "
                                "sgengine.train` (or sgengine.train.train(cfg)), which makes them first")
    return load_annotations(path)


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
    ddp_find_unused = False  # every parameter takes part in every step

    def __init__(self, cfg: TrainConfig, log=print, annotations=None):
        """``annotations``: the self-labels file of a ``self-labels`` run (default: out/annotations.safetensors)."""
        check_runnable(cfg)
        if cfg.deepspeed and cfg.channels_last:
            raise ValueError(ds.CHANNELS_LAST_WITH_DS)
        self.dist = ranks.dist_info()
        self.log = log if self.dist.main else (lambda *a, **k: None)
        self.out, self.device = Path(cfg.out), D.local_device(resolve_device(cfg.device), self.dist)
        D.setup(self.device, self.dist, need_group=cfg.deepspeed)
        self.out.mkdir(parents=True, exist_ok=True)
        self._locked = self.dist.main  # one run per --out (common/runlock.py); finish() or a failed run() lets go
        if self._locked:
            runlock.acquire(self.out, self.log)
        try:
            self._prepare(cfg, annotations)
        except BaseException:
            self._unlock()
            raise

    def _prepare(self, cfg: TrainConfig, annotations) -> None:
        net_cfg = cfg.uvit if cfg.arch == "uvit" else cfg.model  # the network fixes size and channels
        self.data = load_data(cfg.data, net_cfg.img_size, net_cfg.in_channels, self.dist.main, cfg.data_resize)
        report_skipped(self.data, self.log)
        self.ann = build_conditions(cfg, self.data, self.out, annotations)
        if self.ann is not None and len(self.ann) != len(self.data):
            raise ValueError(f"annotation file has {len(self.ann)} entries but {cfg.data} has {len(self.data)} images; "
                             "annotate this exact data with `python -m sgengine.annotate`")
        self.cfg = resolve_model(cfg, self.ann, self.data)
        self._data_to_device()
        self.loader = BatchLoader(self.data, self.device)  # packs: gathered from the map in the background
        self._build()
        self.resumed_from = self._resume() if cfg.resume else self._fresh()
        self._saved, self._saved_step = None, None  # the last checkpoint this run wrote
        self.metrics = MetricsLogger(self.out, self.step if self.resumed_from else None) if self.dist.main else None

    def _data_to_device(self) -> None:
        """The data set (uint8 images, a latent pack's moments) on the GPU when it fits: batches are
        then gathered without host copies."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        rows = self.data.stored()
        if rows.numel() * rows.element_size() <= DATA_ON_GPU_FRACTION * free:
            self.data = self.data.to(self.device)

    def _images(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Floats on the device (uint8 scaled to [-1, 1]; a posterior pack's draw from ``generator``),
        gathered by sgengine.data.BatchLoader."""
        return self.loader.get(idx, generator)

    def _posterior_generator(self, micro: int) -> torch.Generator | None:
        """The generator of this shard's posterior draws (latent packs of mean and std; else None):
        reseeded per (seed, step, micro-step, rank) like the objective's noise but from its own
        stream, so it shifts no other draw, ranks draw distinct eps, and a resume needs no state."""
        if self.data.moments is None:
            return None
        return self.g_post.manual_seed(D.shard_seed(self.cfg.seed, self.step, micro, self.dist, POSTERIOR_STREAM))

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
        self.engine = make_engine(self.net, cfg, self.device, self.dist, self._warmup, self.ddp_find_unused)
        self.loss_fn = self.objective.loss
        self.step, self.watch = 0, LossWatch(self.device)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.g_dev = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.g_post = torch.Generator(self.device)  # seeded per micro-step: _posterior_generator

    def _warmup(self, s: int) -> float:
        return min(1.0, (s + 1) / max(self.cfg.warmup, 1))

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def sched(self):
        return self.engine.lr_scheduler

    def _fresh(self) -> None:
        if step_folders(self.out):
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it, "
                                  "or choose another --out")
        return None

    def _resume(self) -> Path | None:
        ckpt = resume_point(self.out, self.log)
        if ckpt is None:
            self.log(f"--resume: no checkpoint in {self.out} yet; starting from step 0")
            return None
        changes = self._check_same_run(load_meta(ckpt)["config"])
        self.ema.load_state_dict(load_weights(ckpt, "ema"))
        st = load_state(ckpt)
        self.engine.load(ckpt, st)
        if changes:
            apply_optimiser_settings(self.opt, self.sched, self.cfg.lr, self.cfg.weight_decay)
            self.log(f"--resume: optimiser settings changed: {describe_changes(changes)}")
        self.step = st["step"]
        self.g.set_state(st["rng_cpu"])
        self.g_dev.set_state(st["rng_dev"])
        torch.set_rng_state(st["rng_torch"])
        self.log(f"resumed from {ckpt} at step {self.step}")
        return ckpt

    def _check_same_run(self, saved: dict) -> dict:
        """The optimiser settings that changed; raises on any other change (training/resume.py)."""
        return config_changes(to_dict(from_dict(saved)), to_dict(self.cfg))  # JSON turned tuples into lists

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
        x = self._flip(self._images(idx, self._posterior_generator(micro)), flip)
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

    def train_step(self) -> torch.Tensor:
        """One optimizer step. Returns this rank's mean loss as a device tensor: nothing here waits for
        the device or the other ranks (the loss is read and checked at log points and checkpoints)."""
        accum, engine = self.cfg.grad_accum, self.engine
        engine.zero_grad()
        total = 0.0
        for micro in range(accum):
            self.g_dev.manual_seed(D.shard_seed(self.cfg.seed, self.step, micro, self.dist))
            x, cond = self.batch(micro)
            with engine.accumulating(micro, accum):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=engine.bf16):
                    loss = self.loss_fn(engine.forward, x, generator=self.g_dev, **cond).mean()
                engine.backward(loss, accum)
            total = total + loss.detach()
        engine.step()
        engine.update_ema(self.ema, ema_decay(self.step, self.cfg.ema_max))
        self.step += 1
        self.watch.add(total / accum, self.step)
        return total / accum

    def _check_loss(self) -> float:
        """The mean loss since the last log; NonFiniteLoss names the first non-finite step (collective)."""
        mean, bad, value = self.watch.read()
        if bad is not None:
            raise NonFiniteLoss(f"loss became {value} at step {bad}; {self._last_good()}. {NAN_ADVICE}")
        return mean

    def _last_good(self) -> str:
        last = latest_checkpoint(self.out)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        """Train to cfg.steps. Ctrl-C stops at the next step boundary, after that step's checkpoint
        (interrupt.py), and raises Interrupted; the run lock of --out is let go either way."""
        try:
            with StopRequest() as stop:
                self._loop(stop)
                return self.finish()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint written stands
            raise Interrupted(self.step, self._newest(), at_once=True) from None
        finally:
            self._unlock()

    def _loop(self, stop: StopRequest) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.dist.main)
        try:
            while self.step < cfg.steps:
                self.train_step()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    t0 = self._log(t0, bar)
                self._periodic()
                if self.step < cfg.steps and stop.due():
                    raise Interrupted(self.step, self._saved if self._saved_step == self.step else self.checkpoint())
        finally:
            bar.close()

    def _newest(self) -> Path | None:
        return latest_checkpoint(self.out) if self.dist.main else None

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            runlock.release(self.out)

    def _log(self, t0: float, bar) -> float:
        steps, loss = self.watch.n, self._check_loss()
        self.watch.reset()
        now = time.perf_counter()
        rec = {"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0],
               "img_per_s": steps * self.global_batch / max(now - t0, 1e-9)}
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
        self._check_loss()
        state = {"step": self.step, "rng_cpu": self.g.get_state(), "rng_dev": self.g_dev.get_state(),
                 "rng_torch": torch.get_rng_state()}
        model = self.engine.weights()
        self._check_finite(model)
        engine_state, stage = self.engine.save(self.out, self.step)
        state.update(engine_state)
        path = self.out / "ckpt" / f"step_{self.step:08d}"
        if self.dist.main:
            path = save_checkpoint(self.out, self.step, model, self.ema, state, self._meta(),
                                   self.cfg.keep_checkpoints, extra=lambda tmp: self._extra_files(tmp, stage))
            self.metrics.plot(self.out / "loss.png")
        ranks.barrier()
        self._saved, self._saved_step = path, self.step
        return path

    def _check_finite(self, model) -> None:
        """Non-finite weights are never written: the last checkpoint stays the last good one."""
        bad = ranks.from_main(nonfinite_counts(model=model.state_dict(), EMA=self.ema.state_dict())
                              if self.dist.main else None)
        if bad:
            counts = ", ".join(f"{n} in the {name}" for name, n in bad.items())
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step} (non-finite values: {counts}); "
                                f"nothing was saved, {self._last_good()}. {NAN_ADVICE}")

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
        ranks.barrier()
        self._unlock()
        return {"checkpoint": ckpt, "grid": grid, "latest_grid": self.out / "samples.png",
                "metrics": self.out / "metrics.jsonl", "curve": self.out / "loss.png"}
