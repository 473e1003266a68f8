"""Roofline lower bounds for every benchmark case: FLOPs and bytes from explicit formulas, and the
least time they can take on an RTX A5000, an A100 80GB SXM, an H100 SXM and an H200.

    python benchmarks/roofline.py            # the SPEC section 5 cases on the four GPUs (markdown)

The bound of a case is max(compute time, memory time): its FLOPs at the dense peak of the unit
that does them, and its compulsory HBM traffic (every input read once, every output written
once, nothing re-read) at the datasheet bandwidth. It is a floor, not a prediction: a benchmark
row reports ``roofline_pct = 100 * bound / measured time``, its distance from that floor.

FLOPs count multiply and add as two and an exp or a division as one. Non-matmul work of a
network (norms, activations) is not counted, so network cases are floors on their matmuls only.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from dataclasses import dataclass

from sgengine.common.gpus import GPUS, Peak, gpu_for  # noqa: F401 (the GPU table; re-exported)

# The unit a dtype's matmuls run on. float32 inputs may also run as tf32x3 (three TF32 products
# give an fp32-accurate one, as the fused SAG kernel does); a bound takes the cheaper of the two.
MATMUL_UNITS = {2: (("bf16", 1),), 4: (("fp32", 1), ("tf32", 3))}
FP32_UNITS = (("fp32", 1), ("tf32", 3))


@dataclass(frozen=True)
class Work:
    """FLOPs that may run on any of ``units`` ((unit, cost factor) alternatives) and HBM bytes."""
    flops: float
    bytes: float
    units: tuple = (("bf16", 1),)

    def compute_s(self, gpu: Peak) -> float:
        return min(self.flops * cost / getattr(gpu, unit) for unit, cost in self.units)

    def memory_s(self, gpu: Peak) -> float:
        return self.bytes / gpu.hbm

    def bound_s(self, gpu: Peak) -> float:
        return max(self.compute_s(gpu), self.memory_s(gpu))

    def limiter(self, gpu: Peak) -> str:
        return "compute" if self.compute_s(gpu) >= self.memory_s(gpu) else "memory"


def roofline_info(work: Work, device_name: str, seconds: float | None) -> dict:
    """extra_info fields of one benchmark row: flops, bytes and, on a known GPU, the bound and
    the row's percentage of it."""
    info = {"flops": work.flops, "bytes": work.bytes}
    gpu = gpu_for(device_name)
    if gpu is not None:
        info.update(roofline_gpu=gpu.name, bound_ms=work.bound_s(gpu) * 1e3, bound_by=work.limiter(gpu))
        if seconds:
            info["roofline_pct"] = 100 * work.bound_s(gpu) / seconds
    return info


# -- formulas, one per benchmark family ---------------------------------------------------------

def attention(B: int, H: int, N: int, D: int, elem_bytes: int, mass: bool) -> Work:
    """Self-attention over N tokens (bench_sag.py): ``attention_rows`` with Nq = Nk = N."""
    return attention_rows(B, H, N, N, D, elem_bytes, mass)


def attention_rows(B: int, H: int, Nq: int, Nk: int, D: int, elem_bytes: int, mass: bool) -> Work:
    """Nq queries over Nk keys (bench_sag.py; bench_dit.py: SD3's image queries over its joint
    [image; text] keys). FLOPs: S = QK^T and O = PV, 2*Nq*Nk*D each per (batch, head):
    4*B*H*Nq*Nk*D; the per-key mass needs no more matmul work when S is kept on chip (a kernel
    that recomputes S for the mass, 1.5x this, pays for not storing it).
    Bytes: q read and o written (Nq rows), k and v read (Nk rows), B*H*D*(2*Nq + 2*Nk) elements;
    the mass adds B*Nk float32 (mean over heads)."""
    return Work(4 * B * H * Nq * Nk * D, B * H * D * (2 * Nq + 2 * Nk) * elem_bytes + (4 * B * Nk if mass else 0),
                MATMUL_UNITS[elem_bytes])


def sag_degrade(B: int, C: int, H: int, W: int, side: int, kernel_size: int, elem_bytes: int) -> Work:
    """The SAG degraded input (bench_sag.py): x_deg = a * where(mask, blur(x0), x0) + b * eps.
    FLOPs: the separable Gaussian blur, two passes of kernel_size multiply-adds a pixel
    (4 * kernel_size), plus 3 for the mix, on every pixel (the chain blurs every pixel).
    Bytes: x0 and eps read, x_deg written (x_t is not needed), the float32 side x side mass map,
    and float32 a, b per sample."""
    pixels = B * C * H * W
    return Work(pixels * (4 * kernel_size + 3), 3 * pixels * elem_bytes + 4 * B * side * side + 8 * B, FP32_UNITS)


def lloyd(N: int, d: int, K: int, elem_bytes: int, units: tuple) -> Work:
    """One Lloyd iteration (bench_kmeans.py). FLOPs: the distance GEMM x c^T, 2*N*K*d, plus N*d
    adds of the centroid sums. Bytes: x read once (elem_bytes a feature: the assignment and the
    sums can share one pass), float32 centroids read and written, 2*K*d*4."""
    return Work(2 * N * K * d + N * d, N * d * elem_bytes + 8 * K * d, units)


def sinkhorn(B: int, K: int, iters: int, elem_bytes: int) -> Work:
    """Sinkhorn-Knopp codes (bench_sinkhorn.py). FLOPs per score: scale and exp (2), per
    iteration a row and a column pass of one add and one multiply each (4), and the final
    normalisation (1): B*K*(3 + 4*iters) on the fp32 units.
    Bytes: the scores read once and float32 Q written once, B*K*(elem_bytes + 4). A streaming
    kernel re-reads the scores once per pass (2*iters + 1 reads) whenever B*K exceeds the L2
    cache; this floor assumes they stay on chip, as 512x5000 float32 (10 MB) can."""
    return Work(B * K * (3 + 4 * iters), B * K * (elem_bytes + 4), FP32_UNITS)


def sample_step(fwd_flops_per_img: float, batch: int, params: int, kind: str) -> Work:
    """One sampling step of a network (bench_sag_step.py). Forwards: 'plain' B images, 'cfg' one
    batched forward of 2B, 'sag' that 2B forward and one more of B on the degraded input.
    FLOPs: images x forward FLOPs per image (bf16 autocast). Bytes: the float32 weights read once
    per dependent forward (1, 1, 2; 4*params each: they exceed the L2 cache) plus the 3-channel
    float32 input and output, negligible beside them."""
    images, reads = {"plain": (batch, 1), "cfg": (2 * batch, 1), "sag": (3 * batch, 2)}[kind]
    return Work(images * fwd_flops_per_img, reads * 4 * params, MATMUL_UNITS[2])


def guided_passes(fwd_flops_per_img: float, batch: int, params: int, passes: int, elem_bytes: int) -> Work:
    """One step through a diffusers guider (bench_dit.py): ``passes`` separate forwards of ``batch``
    (CFG 2; SAG, PAG or SEG with CFG 3). FLOPs: passes x batch x forward FLOPs per image. Bytes: the
    weights (elem_bytes each) read once per pass; activations are negligible beside them."""
    return Work(passes * batch * fwd_flops_per_img, passes * elem_bytes * params, MATMUL_UNITS[elem_bytes])


def train_step(flops_per_img: float, batch: int, params: int) -> Work:
    """One training step (bench_train.py). FLOPs: batch x the forward + backward FLOPs of one
    image (3x the forward for convolutions and matmuls), bf16 autocast.
    Bytes: the fused AdamW update, float32 parameter, gradient and both moments read and
    parameter and moments written, 7 * 4 * params (activations can stay on chip in a floor)."""
    return Work(batch * flops_per_img, 28 * params, MATMUL_UNITS[2])


@functools.lru_cache(maxsize=None)
def unet_flops(model_cfg, num_classes: int = 1000, train: bool = False) -> tuple[float, int]:
    """(FLOPs per image, parameters) of sgengine's UNet: torch.utils.flop_counter's per-op
    formulas summed over one forward (and backward when ``train``) on the meta device, where
    nothing is computed or allocated and attention runs as the math backend's two batched
    matmuls (the counter has no formula for the CPU flash kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sgengine.models.unet import UNet
    cfg = dataclasses.replace(model_cfg, num_classes=num_classes)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        net = UNet(cfg)
        x = torch.randn(1, cfg.in_channels, cfg.img_size, cfg.img_size)
        out = net(x, torch.full((1,), 500.0), y=torch.zeros(1, num_classes))
        if train:
            out.float().square().mean().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters())


# -- the SPEC section 5 cases, with the times measured there on one H100 ------------------------

def spec_cases() -> list[tuple[str, Work, str]]:
    """(case, work, what SPEC section 5 measured on an H100 as 'label ms, ...')."""
    from sgengine.models.unet import UNET_PRESETS
    fwd32, params32 = unet_flops(UNET_PRESETS["in32"])
    train32, _ = unet_flops(UNET_PRESETS["in32"], train=True)
    train64, params64 = unet_flops(UNET_PRESETS["in64"], train=True)
    tf32_units, fp32_units = (("tf32", 1),), (("fp32", 1),)
    return [
        ("train in32, batch 128", train_step(train32, 128, params32),
         "bf16 eager 73.8, compiled 41.0 (1735 / 3123 img/s)"),
        ("train in64, batch 48", train_step(train64, 48, params64), "bf16 eager 93.6, compiled 53.1 (513 / 904 img/s)"),
        ("sample step in32, batch 256: plain", sample_step(fwd32, 256, params32, "plain"), "eager 46.5, tuned 14.2"),
        ("sample step in32, batch 256: CFG", sample_step(fwd32, 256, params32, "cfg"), "eager 86.8, tuned 26.0"),
        ("sample step in32, batch 256: SAG+CFG", sample_step(fwd32, 256, params32, "sag"), "eager 129.5"),
        ("attention B16 H8 N1024 d64, bf16: SDPA", attention(16, 8, 1024, 64, 2, mass=False), "SDPA 0.12"),
        ("attention B16 H8 N1024 d64, bf16: + key mass", attention(16, 8, 1024, 64, 2, mass=True),
         "materialised 1.37"),
        ("attention B16 H8 N4096 d64, bf16: SDPA", attention(16, 8, 4096, 64, 2, mass=False), "SDPA 1.18"),
        ("attention B16 H8 N4096 d64, bf16: + key mass", attention(16, 8, 4096, 64, 2, mass=True),
         "materialised 22.9"),
        ("SD3-medium joint attention B2 H24 4096 img of 4429 tokens d64, bf16: + key mass",
         attention_rows(2, 24, 4096, 4096 + 333, 64, 2, mass=True), ""),
        ("SAG degrade B256 3x32x32 k9, bf16", sag_degrade(256, 3, 32, 32, 8, 9, 2), ""),
        ("SAG degrade B256 3x64x64 k31, bf16", sag_degrade(256, 3, 64, 64, 16, 31, 2), ""),
        ("Sinkhorn 512x5000, fp32, 3 iters", sinkhorn(512, 5000, 3, 4), "SwAV 0.23, compiled 0.27"),
        ("Sinkhorn 1024x10000, fp32, 3 iters", sinkhorn(1024, 10000, 3, 4), "SwAV 0.72, compiled 0.50"),
        ("Sinkhorn 4096x10000, fp32, 3 iters", sinkhorn(4096, 10000, 3, 4), "SwAV 2.54, compiled 1.93"),
        ("Lloyd N1M d768 K10k, bf16", lloyd(10**6, 768, 10**4, 2, MATMUL_UNITS[2]), "assignment only 131"),
        ("Lloyd N1M d768 K10k, tf32", lloyd(10**6, 768, 10**4, 4, tf32_units), "TF32 106"),
        ("Lloyd N1M d768 K10k, fp32", lloyd(10**6, 768, 10**4, 4, fp32_units), "fp32 365"),
    ]


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def _spec_pct(work: Work, measured: str) -> str:
    """Each SPEC figure 'label ms' as 'label ms (p% of the H100 bound)'."""
    bound = work.bound_s(GPUS["H100"])
    parts = []
    for part in filter(None, (p.strip() for p in measured.split("(")[0].split(","))):
        label, _, ms = part.rpartition(" ")
        parts.append(f"{part} ({100 * bound / (float(ms) * 1e-3):.0f}%)")
    return ", ".join(parts)


def markdown(cases: list[tuple[str, Work, str]]) -> str:
    """The bound of each case on each GPU ('c' compute-, 'm' memory-bound) and SPEC's H100 times."""
    lines = ["| case | GFLOP | MB | " + " | ".join(g.name for g in GPUS.values()) +
             " | SPEC section 5 on an H100, ms (% of its bound) |", "|---" * (4 + len(GPUS)) + "|"]
    for name, work, measured in cases:
        bounds = " | ".join(f"{_time(work.bound_s(g))} {work.limiter(g)[0]}" for g in GPUS.values())
        lines.append(f"| {name} | {work.flops / 1e9:.4g} | {work.bytes / 1e6:.4g} | {bounds} | "
                     f"{_spec_pct(work, measured)} |")
    peaks = ["", "| GPU | bf16 dense TFLOP/s | tf32 dense | fp32 | DRAM GB/s | source |", "|---" * 6 + "|"]
    peaks += [f"| {g.name} | {g.bf16 / 1e12:g} | {g.tf32 / 1e12:g} | {g.fp32 / 1e12:g} | {g.hbm / 1e9:g} | "
              f"{g.source} |" for g in GPUS.values()]
    return "\n".join(lines + peaks) + "\n"


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(markdown(spec_cases()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
