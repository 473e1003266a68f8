"""Training throughput: sgengine's Trainer.train_step vs a diffusers UNet2DModel loop.

Run: ``python -m pytest benchmarks/bench_train.py --benchmark-only -q``.

Rows (one GPU): in32 at batch 128 and in64 at batch 48, bf16 autocast, eager, torch.compile
and torch.compile with CUDA graphs (mode 'reduce-overhead'); the diffusers UNet2DModel of the
same configuration (when diffusers is installed) trained by a plain bf16 + fused AdamW loop,
eager and compiled; DeepSpeed ZeRO-1 / ZeRO-2 on one GPU (when deepspeed is installed) to show
their overhead.
extra_info holds img/s, FLOPs per image (FlopCounterMode) and MFU against the bf16 peak.
Baselines (SPEC section 5, H100, diffusers UNet): 32x32 batch 128: 1735 img/s bf16 eager,
3123 compiled; 64x64 batch 48: 513 / 904; DeepSpeed bf16 ZeRO-0/1/2: 1222 / 994 / 944.
Without a GPU only the tiny preset runs, eager, as a smoke test.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
import roofline
from benchlib import ON_GPU, per_second, record, sizes, sync, timed

from sgengine.config import preset
from sgengine.training.bench import SYNTHETIC_K, detect_peak, flops_per_image, synthetic_config
from sgengine.training.trainer import Trainer

CASES = sizes([("in32", 128), ("in64", 48)], ("tiny", 16))
# eager, torch.compile, and torch.compile with CUDA graphs (mode 'reduce-overhead')
COMPILE = ["eager", "default", "reduce-overhead"] if ON_GPU else ["eager"]
ROUNDS, WARMUP = (30, 5) if ON_GPU else (3, 1)


def _cfg(name: str, batch: int, **kw):
    return dataclasses.replace(preset(name), batch_size=batch, device="auto", **kw)


def _record(benchmark, batch: int, flops: float, params: int, provider: str, **info) -> None:
    img_s = per_second(batch, benchmark)
    peak = detect_peak(torch.device("cuda")) if ON_GPU else None
    record(benchmark, roofline.train_step(flops, batch, params), provider=provider, batch=batch, img_per_s=img_s,
           flops_per_img=flops, mfu=flops * img_s / peak if peak and img_s else None, **info)


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _run_trainer(benchmark, cfg, provider: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(synthetic_config(cfg, Path(tmp)), log=lambda *a, **k: None)
        flops = flops_per_image(tr)
        benchmark.pedantic(timed(tr.train_step), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        _record(benchmark, tr.global_batch, flops, _params(tr.net), provider, compile=cfg.compile_mode if cfg.compile else False,
                bf16=tr.engine.bf16)


@pytest.mark.parametrize("mode", COMPILE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_sgengine(benchmark, case, mode):
    compiled = {"compile": True, "compile_mode": mode} if mode != "eager" else {}
    _run_trainer(benchmark, _cfg(*case, **compiled), "sgengine")


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_deepspeed_overhead(benchmark, case, stage):
    pytest.importorskip("deepspeed", reason="pip install deepspeed")
    _run_trainer(benchmark, _cfg(*case, deepspeed=True, zero_stage=stage), f"deepspeed-zero{stage}")


# -- the diffusers baseline ---------------------------------------------------------------------
def diffusers_unet(cfg):
    """UNet2DModel with our UNet's widths, depths, attention levels and a class embedding."""
    from diffusers import UNet2DModel

    m = cfg.model
    attn = [2 ** i in m.attention_ds for i in range(len(m.channel_mult))]
    return UNet2DModel(sample_size=m.img_size, in_channels=m.in_channels, out_channels=m.in_channels,
                       block_out_channels=tuple(m.channels * k for k in m.channel_mult),
                       layers_per_block=m.num_res_blocks, attention_head_dim=m.channels * max(m.channel_mult) // m.heads,
                       down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                       up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                       num_class_embeds=SYNTHETIC_K, resnet_time_scale_shift="scale_shift", norm_num_groups=32
                       if m.channels % 32 == 0 else m.channels // 2)


def _diffusers_step(cfg, device, compiled: bool):
    """One training step of the baseline: eps-MSE, bf16 autocast, clipping, fused AdamW."""
    net = diffusers_unet(cfg).to(device)
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    m, b = cfg.model, cfg.batch_size
    x0 = torch.randn(b, m.in_channels, m.img_size, m.img_size, device=device)
    y = torch.randint(0, SYNTHETIC_K, (b,), device=device)
    abar = torch.linspace(0.999, 0.01, cfg.T, device=device)

    def step():
        t = torch.randint(0, cfg.T, (b,), device=device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = fwd(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        return float(loss.detach())
    step.params = sum(p.numel() for p in net.parameters())
    return step


@pytest.mark.parametrize("compile_", [False, True] if ON_GPU else [False], ids=lambda c: "compiled" if c else "eager")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_diffusers_baseline(benchmark, case, compile_):
    pytest.importorskip("diffusers", reason="the baseline needs diffusers: pip install diffusers")
    cfg = _cfg(*case)
    device = torch.device("cuda" if ON_GPU else "cpu")
    with FlopCounterMode(display=False) as counter:  # eager: the counter cannot see inside compiled graphs
        _diffusers_step(cfg, device, compiled=False)()
    step = _diffusers_step(cfg, device, compiled=compile_)
    sync()
    benchmark.pedantic(timed(step), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    flops = counter.get_total_flops() / cfg.batch_size
    _record(benchmark, cfg.batch_size, flops, step.params, "diffusers", compile=compile_, bf16=ON_GPU)
