"""SAG's key mass at a diffusion transformer's attention size, against the materialised map.

SD3-medium at 1024 px: 4096 image tokens (64x64 latent patches) and 333 text tokens in ONE joint
sequence [img; txt], 24 heads of 64, batch 2 (SAG's unconditional half and a second image). SAG
needs the mass of the image queries at the image keys, the softmax taken over every key (text
ones included). Providers, both on the image-query rows q[:, :, :4096] against all 4429 keys:

- "sgengine": ``attention_with_key_mass`` (Triton on a GPU; on a CPU the PyTorch path, which runs
  query chunks of ``CHUNK_BYTES`` of temporaries), never the 4096 x 4429 map;
- "materialised": ``attention_with_key_mass_ref``, softmax(QK^T) stored whole, out = A V, mass =
  column sums: what public SAG code does (the map alone is 2 x 24 x 4096 x 4429 floats: 3.5 GB in
  float32, 1.7 GB in bfloat16).

Goal (issue 19): peak memory of "sgengine" <= 0.05 x the materialised one's, on a CPU and on a GPU.

``test_dit_guider_step``: one denoising step of an SD3 transformer (random weights; on a GPU 8
blocks of 24 x 64 at a 64x64 latent, 1024 image tokens, B=2, bf16; else a tiny one) through
diffusers' guider protocol as the modular SD3 loop runs it: "cfg" (``ClassifierFreeGuidance``:
cond and uncond passes of B), "sag" (``SAGGuider``: the same two passes, the key mass read during
the uncond one, the degrade and one more pass of B) and "pag" (``PAGGuider``). Goal: SAG+CFG over
CFG <= 1.55 (three passes against two is 1.5); ``sag_over_cfg`` / ``pag_over_cfg`` in each row,
from medians measured side by side.

Two ways to run it:
- ``pytest benchmarks/bench_dit.py --benchmark-only``: on a GPU at SD3 size, bfloat16, with time,
  ``torch.cuda.max_memory_allocated`` above the inputs for both providers and their ratio
  (``memory_ratio`` in the sgengine row), and the kernel checked against the reference under the
  error budget; without a GPU at a smoke size. benchmarks/runbook.py runs it ("kernels: DiT attention").
- ``python benchmarks/bench_dit.py``: on the CPU at SD3 size, float32, each provider in a fresh
  subprocess, interleaved: the peak resident memory above the inputs (``VmHWM`` reset through
  ``/proc/self/clear_refs`` once q, k, v exist, read after two calls; Linux) and the best time, with
  the CPU model, the BLAS and the thread count printed beside the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
import roofline
from benchlib import DEVICE, ON_GPU, check_budget, cpu_model, peak_memory, record, sizes, timed, torch_blas

from sgengine.kernels.attention_key_mass import attention_with_key_mass, attention_with_key_mass_ref

SD3 = (2, 24, 4096, 333, 64)  # (B, heads, image tokens, text tokens, head dim)
SHAPES = sizes([SD3], (2, 2, 96, 11, 16))
PROVIDERS = {
    "sgengine": lambda q, k, v, backend="auto": attention_with_key_mass(q, k, v, backend=backend),
    "materialised": lambda q, k, v, backend="auto": attention_with_key_mass_ref(q, k, v),
}


def joint_qkv(B, H, n_img, n_txt, D, dtype, device="cpu"):
    """q of the image rows (B, H, n_img, D) and k, v of the joint [img; txt] sequence."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (n_img, n_img + n_txt, n_img + n_txt))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def image_mass(provider: str, q, k, v, backend="auto"):
    """(out of the image rows, mass at the image keys (B, n_img)): text keys dropped."""
    out, mass = PROVIDERS[provider](q, k, v, backend)
    return out, mass[:, : q.shape[2]]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-img{}-txt{}-D{}".format(*s))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_dit_key_mass(benchmark, provider, shape):
    B, H, n_img, n_txt, D = shape
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, k, v = joint_qkv(*shape, dtype, DEVICE)
    fn = timed(lambda *a: image_mass(provider, *a))
    fn(q, k, v)  # autotune / warm up outside the measurement
    peak_gb = peak_memory(fn, q, k, v)
    info = {}
    if provider == "sgengine" and ON_GPU:
        _check(benchmark, q[:1], k[:1], v[:1])
        info["memory_ratio"] = peak_gb / peak_memory(timed(lambda *a: image_mass("materialised", *a)), q, k, v)
    benchmark(fn, q, k, v)
    work = roofline.attention_rows(B, H, n_img, n_img + n_txt, D, q.element_size(), mass=True)
    record(benchmark, work, provider=provider, B=B, H=H, image_tokens=n_img, text_tokens=n_txt, D=D,
           dtype=str(dtype), peak_memory_gb=peak_gb, **info)


def _check(benchmark, q, k, v) -> None:
    """The kernel against the materialised reference in bf16 and in float32, one sample."""
    got = image_mass("sgengine", q, k, v)
    low = image_mass("materialised", q, k, v)
    truth = image_mass("materialised", q.float(), k.float(), v.float())
    for name, i, floor in (("out", 0, 1e-3), ("mass", 1, 1e-5)):
        check_budget(benchmark, name, got[i], low[i], truth[i], floor)


# (layers, heads, head dim, latent side, batch)
STEP_SHAPES = sizes([(8, 24, 64, 64, 2)], (2, 4, 8, 16, 1))
CPU_STEP = (4, 8, 32, 32, 2)  # ``python benchmarks/bench_dit.py --step``: 256 image tokens


def sd3_step_inputs(layers, heads, head_dim, side, B, dtype):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    width = heads * head_dim
    net = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=layers,
                                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
                                caption_projection_dim=width, pooled_projection_dim=64, out_channels=16,
                                pos_embed_max_size=side // 2)
    net = net.to(DEVICE, dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, side, side, generator=g).to(DEVICE, dtype)
    cond, uncond = ((torch.randn(B, 77, 64, generator=g).to(DEVICE, dtype),
                     torch.randn(B, 64, generator=g).to(DEVICE, dtype)) for _ in range(2))
    return net, x, torch.tensor(700.0, device=DEVICE), cond, uncond




def step_guiders() -> dict:
    from diffusers.guiders import ClassifierFreeGuidance
    from sgengine.guidance.guiders import PAGGuider, SAGGuider
    return {"cfg": ClassifierFreeGuidance(guidance_scale=5.0), "sag": SAGGuider(guidance_scale=5.0, sag_scale=0.75),
            "pag": PAGGuider(guidance_scale=5.0, perturbed_guidance_scale=3.0)}


def step_medians(steps: dict, n: int) -> dict:
    """Median ms of each step over ``n`` interleaved rounds (side by side: load hits all alike)."""
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * sorted(ts)[n // 2] for name, ts in times.items()}


def step_runs(shape) -> tuple[dict, float, int]:
    """(the three guided steps, forward FLOPs per image, parameters) of one shape, warmed up."""
    from sgengine.guidance.guiders import sd3_guided_step
    inputs = sd3_step_inputs(*shape, torch.bfloat16 if ON_GPU else torch.float32)
    steps = {name: timed(torch.no_grad()(lambda g=g: sd3_guided_step(g, *inputs)))
             for name, g in step_guiders().items()}
    for run in steps.values():  # warm up (autotune) outside the timing
        run()
    net, x, t, cond, _ = inputs
    # The math attention backend: the counter has no formula for the CPU flash kernel.
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        net(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=cond[0], pooled_projections=cond[1])
    return steps, counter.get_total_flops() / x.shape[0], sum(p.numel() for p in net.parameters())


_MEASURED: dict = {}


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "L{}-H{}x{}-latent{}-B{}".format(*s))
@pytest.mark.parametrize("provider", ["cfg", "sag", "pag"])
def test_dit_guider_step(benchmark, provider, shape):
    pytest.importorskip("diffusers")
    if shape not in _MEASURED:  # the three providers' medians once per shape, side by side
        steps, flops, params = step_runs(shape)
        _MEASURED[shape] = steps, flops, params, step_medians(steps, 10 if ON_GPU else 2)
    steps, flops, params, ms = _MEASURED[shape]
    benchmark(steps[provider])
    layers, heads, head_dim, side, B = shape
    work = roofline.guided_passes(flops, B, params, 2 if provider == "cfg" else 3, 2 if ON_GPU else 4)
    record(benchmark, work, provider=provider, layers=layers, heads=heads, head_dim=head_dim, latent=side, batch=B,
           image_tokens=(side // 2) ** 2, **{f"{k}_ms": v for k, v in ms.items()},
           sag_over_cfg=ms["sag"] / ms["cfg"], pag_over_cfg=ms["pag"] / ms["cfg"], target_ratio=1.55)


# -- the CPU measurement: one fresh process per provider and round ------------------------------

def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: its peak since the reset)."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def child(provider: str) -> dict:
    """Peak resident bytes above the inputs over two calls, and the faster call's seconds."""
    q, k, v = joint_qkv(*SD3, torch.float32)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    base, times = _status("VmRSS"), []
    for _ in range(2):
        t0 = time.perf_counter()
        out, mass = image_mass(provider, q, k, v, backend="torch")
        times.append(time.perf_counter() - t0)
        del out, mass
    return {"provider": provider, "peak_bytes": _status("VmHWM") - base, "seconds": min(times)}


def cpu_facts() -> dict:
    """CPU model, BLAS and threads: CPU figures mean nothing without them."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "blas": torch_blas(),
            "mkldnn": torch.backends.mkldnn.is_available(), "torch": torch.__version__}


def measure(rounds: int) -> dict:
    """Each provider ``rounds`` times, interleaved, each run in a fresh subprocess."""
    runs = []
    for _ in range(rounds):
        for provider in PROVIDERS:
            done = subprocess.run([sys.executable, __file__, "--child", provider], capture_output=True, text=True,
                                  timeout=1800, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {p: {"peak_bytes": min(r["peak_bytes"] for r in runs if r["provider"] == p),
                "seconds": min(r["seconds"] for r in runs if r["provider"] == p)} for p in PROVIDERS}
    return {"shape": dict(zip(("B", "heads", "image_tokens", "text_tokens", "head_dim"), SD3)), **cpu_facts(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "providers": best,
            "memory_ratio": best["sgengine"]["peak_bytes"] / best["materialised"]["peak_bytes"],
            "time_ratio": best["sgengine"]["seconds"] / best["materialised"]["seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds per provider (default 1)")
    p.add_argument("--step", action="store_true", help=f"the guided-step ratios on the CPU instead, {CPU_STEP} "
                   "(layers, heads, head dim, latent side, batch), float32, --rounds interleaved rounds")
    p.add_argument("--child", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.step:
        ms = step_medians(step_runs(CPU_STEP)[0], args.rounds)
        print(json.dumps({"shape": CPU_STEP, **cpu_facts(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                          "ms": ms, "sag_over_cfg": ms["sag"] / ms["cfg"], "pag_over_cfg": ms["pag"] / ms["cfg"]},
                         indent=1))
        return 0
    result = measure(args.rounds)
    print(json.dumps(result, indent=1))
    ours, theirs = result["providers"]["sgengine"], result["providers"]["materialised"]
    print(f"\nSD3-medium key mass, CPU float32 ({result['cpu']}, {result['threads']} threads, BLAS "
          f"{result['blas']}, {result['date']}): peak {ours['peak_bytes'] / 2**20:.0f} MiB vs "
          f"{theirs['peak_bytes'] / 2**20:.0f} MiB materialised (ratio {result['memory_ratio']:.3f}); "
          f"time {ours['seconds']:.2f} s vs {theirs['seconds']:.2f} s ({result['time_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
