"""Training throughput of the real ``Trainer.train_step``: img/s, FLOPs per image, MFU.

    python -m sgengine.training.bench --preset in32 --steps 50 [--compile true [--compile_mode reduce-overhead]]
        [--batch_size 128]
    python -m sgengine.training.bench --preset in64 --deepspeed true --zero_stage 2

Any TrainConfig flag is accepted. The data are random uint8 images with random labels
(throughput does not depend on content), written to a temporary .npz so the trainer's
own data path (in-memory uint8, normalised on the device) is what gets measured.
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one eager forward and
backward of a separate copy of the network; MFU = flops_per_img * img_per_s / peak.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..common.flags import Count, FlagParser, Positive, add_typed, run_cli
from ..common.gpus import gpu_for
from ..config import TrainConfig, build_parser, parse_args
from ..diffusion.objectives import build_network
from .trainer import Trainer

SYNTHETIC_K = 1000  # label classes of the synthetic data (ImageNet's)


def detect_peak(device: torch.device) -> float | None:
    """The dense bf16 peak of a GPU in sgengine.common.gpus (A5000, A100 80GB, H100 SXM, H200),
    or None (MFU is then not reported: a wrong peak would be worse than none)."""
    if device.type != "cuda":
        return None
    gpu = gpu_for(torch.cuda.get_device_name(device))
    return gpu.bf16 if gpu else None


def synthetic_config(cfg: TrainConfig, root: Path, n: int = 2048) -> TrainConfig:
    """``cfg`` pointed at random images of its model's shape, labelled, in a fresh run folder."""
    m = cfg.uvit if cfg.arch == "uvit" else cfg.model
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, m.in_channels, m.img_size, m.img_size), dtype=np.uint8)
    y = rng.integers(0, SYNTHETIC_K, n)
    y[0] = SYNTHETIC_K - 1  # so the label count is K whatever the draw
    np.savez(root / "data.npz", x=x, y=y)
    return dataclasses.replace(cfg, data=str(root / "data.npz"), condition="labels", out=str(root / "run"),
                               resume=False, ckpt_every=0, sample_every=0, eval_every=0)


def flops_per_image(trainer: Trainer) -> float:
    """Model FLOPs of one training forward + backward, per image (eager, a separate copy)."""
    net = trainer.objective.wrap(build_network(trainer.cfg)).to(trainer.device)
    x, cond = trainer.batch(0)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.engine.bf16):
            loss = trainer.loss_fn(net, x, generator=trainer.g_dev, **cond).mean()
        loss.backward()
    return counter.get_total_flops() / x.shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, steps: int, warmup: int = 3) -> float:
    """img/s over ``steps`` optimizer steps after ``warmup`` (compilation happens there)."""
    for _ in range(warmup):
        trainer.train_step()
    sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)
    return steps * trainer.global_batch / (time.perf_counter() - t0)


def bench(cfg: TrainConfig, steps: int = 50, peak: float | None = None, warmup: int = 3) -> dict:
    """dict(img_per_s, mfu, flops_per_img, ...) of ``cfg``'s training step on synthetic data."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(synthetic_config(cfg, Path(tmp)), log=lambda *a, **k: None)
        flops = flops_per_image(trainer)
        img_s = measure(trainer, steps, warmup)
        peak = peak or detect_peak(trainer.device)
        return {"img_per_s": img_s, "flops_per_img": flops, "mfu": flops * img_s / peak if peak else None,
                "peak_flops": peak, "global_batch": trainer.global_batch, "device": str(trainer.device),
                "bf16": trainer.engine.bf16, "compile": cfg.compile_mode if cfg.compile else False,
                "zero_stage": cfg.zero_stage if cfg.deepspeed else None}


def main(argv=None) -> int:
    prog = "python -m sgengine.training.bench"
    p = FlagParser(prog=prog, add_help=False)
    add_typed(p, "--steps", Count, default=50, help="timed optimizer steps (after 3 warm-up steps)")
    add_typed(p, "--peak_tflops", Positive | None, default=None, help="peak for MFU (default: detect the GPU)")
    own, rest = p.parse_known_args(argv)
    train = build_parser(prog)
    if "--help" in rest or "-h" in rest:
        p.print_help()
        train.print_help()
        return 0
    cfg = parse_args(rest, parser=train)
    peak = own.peak_tflops * 1e12 if own.peak_tflops else None
    print(json.dumps(bench(cfg, own.steps, peak), indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
