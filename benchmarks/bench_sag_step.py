"""One sampling step of self-attention guidance + CFG vs CFG alone, on the ImageNet32 UNet.

Run: ``python -m pytest benchmarks/bench_sag_step.py --benchmark-only -q``.

Model: the paper's ImageNet32 UNet (preset in32, Table 8) conditioned on num_classes=1000, bf16
autocast, batch 256, DDPM eps parameterisation at t = 500. Providers: "cfg" (one batched forward
of 2B, ``CFG``) and "sag" (``SAG`` with w = 2, s = 0.75: the same 2B forward with the key mass of
one layer captured for the unconditional half, the fused degrade, one extra forward of B).
Layers: the mid-block attention ("mid.1.attn", 8x8) and a high-resolution one; in32 attends only
at 8x8 ("resolution 4"), so the high-resolution case uses in32 with attention_ds=(2, 4) and reads
its 16x16 layer (public SAG code cannot afford that: it materialises the attention map).

Target on one H100: SAG+CFG <= 1.55x CFG (the floor is 1.5x: 3B forwards instead of 2B). The ratio
and both times (ms) are recorded in ``extra_info``. Without a GPU only a tiny smoke size runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
import roofline
from benchlib import DEVICE, ON_GPU, record, sync

from sgengine.config import preset
from sgengine.guidance import CFG, SAG, capture_key_mass, list_attention_layers, parameterization_for
from sgengine.models.unet import UNET_PRESETS, UNet

BATCH, CLASSES = (256, 1000) if ON_GPU else (2, 10)
BASE = "in32" if ON_GPU else "tiny"
# (model name, attention_ds, which layer)
CASES = [(BASE, None, "mid"), (BASE + "-attn-hires", (1, 2) if not ON_GPU else (2, 4), "hires")]


def _autocast():
    return torch.autocast("cuda", torch.bfloat16) if ON_GPU else contextlib.nullcontext()


def _model_config(attention_ds):
    cfg = UNET_PRESETS[BASE]
    return dataclasses.replace(cfg, num_classes=CLASSES, attention_ds=attention_ds or cfg.attention_ds)


def _setup(cfg):
    torch.manual_seed(0)
    net = UNet(cfg).to(DEVICE).eval()
    x = torch.randn(BATCH, cfg.in_channels, cfg.img_size, cfg.img_size, device=DEVICE)
    y = F.one_hot(torch.randint(CLASSES, (BATCH,)), CLASSES).float().to(DEVICE)
    return net, x, torch.full((BATCH,), 500.0, device=DEVICE), y


def _highest_res_layer(net, x, t, y) -> str:
    """The attention layer with the largest feature map, found by capturing every layer once."""
    caps = [capture_key_mass(net, name) for name in list_attention_layers(net)]
    with torch.no_grad(), _autocast():
        net(x[:1], t[:1], y=y[:1])
    for cap in caps:
        cap.close()
    return max(caps, key=lambda c: c.mass.shape[-1] * c.mass.shape[-2]).layer


def _step(fn, x, t):
    def run():
        with torch.no_grad(), _autocast():
            out = fn(x, t)
        sync()
        return out
    return run


def _median_ms(run, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[n // 2]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}")
@pytest.mark.parametrize("provider", ["cfg", "sag"])
def test_sag_cfg_step(benchmark, provider, case):
    name, attention_ds, which = case
    model_cfg = _model_config(attention_ds)
    net, x, t, y = _setup(model_cfg)
    layer = "mid.1.attn" if which == "mid" else _highest_res_layer(net, x, t, y)
    param = parameterization_for("ddpm", preset("digits"))
    cfg_step = _step(CFG(net, 2.0, y=y), x, t)
    with SAG(net, param, layer, scale=0.75, w=2.0, y=y) as sag:
        sag_step = _step(sag, x, t)
        run = sag_step if provider == "sag" else cfg_step
        for warm in (cfg_step, sag_step):  # autotune the Triton kernels outside the timing
            warm()
        n = 10 if ON_GPU else 2
        cfg_ms, sag_ms = _median_ms(cfg_step, n), _median_ms(sag_step, n)
        benchmark(run)
        grid = tuple(sag.hook.mass.shape[-2:])
    fwd_flops, params = roofline.unet_flops(model_cfg, CLASSES)
    work = roofline.sample_step(fwd_flops, BATCH, params, provider)  # the degrade is negligible beside it
    record(benchmark, work, provider=provider, model=name, layer=layer, attention_grid=grid, batch=BATCH,
           dtype="bfloat16 autocast" if ON_GPU else "float32", cfg_ms=cfg_ms, sag_ms=sag_ms,
           sag_over_cfg=sag_ms / cfg_ms, target_ratio=1.55)
