"""Facts about the GPUs the engine targets: dense peak rates, memory bandwidth and SM counts,
each with its source. One table for the roofline (benchmarks/roofline.py), the training
benchmark's MFU (sgengine.training.bench) and the kernel audit's waves (sgengine.kernels.audit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Per GPU: dense (no 2:4 sparsity) tensor-core FLOP/s for bf16/fp16 inputs with fp32 accumulation
# and for tf32, non-tensor fp32 FLOP/s, and DRAM bandwidth in bytes/s. NVIDIA quotes tensor rates
# "with sparsity"; the dense rate is half of that.


@dataclass(frozen=True)
class Peak:
    name: str
    pattern: str  # re.fullmatch against torch.cuda.get_device_name()
    bf16: float
    tf32: float
    fp32: float
    hbm: float
    sms: int  # streaming multiprocessors: one wave of programs
    source: str


GPUS = {
    "A5000": Peak(
        "RTX A5000", r"NVIDIA RTX A5000", bf16=111.1e12, tf32=55.6e12, fp32=27.8e12, hbm=768e9, sms=64,
        source="NVIDIA RTX A5000 datasheet (2021): 27.8 TFLOPS FP32, 222.2 TFLOPS tensor with sparsity, "
               "768 GB/s GDDR6. Dense bf16 = 222.2 / 2 (64 SMs x 1024 FLOP/clk x 1.695 GHz); tf32 is half "
               "of bf16 on GA102 (NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A)."),
    "A100": Peak(
        "A100 80GB SXM", r"NVIDIA A100[- ]SXM4?-80GB", bf16=312e12, tf32=156e12, fp32=19.5e12, hbm=2039e9, sms=108,
        source="NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: BF16 312 TFLOPS (624 with "
               "sparsity), TF32 156 (312), FP32 19.5, HBM2e 2,039 GB/s; 108 SMs (NVIDIA A100 Tensor Core "
               "GPU Architecture whitepaper)."),
    "H100": Peak(
        "H100 SXM", r"NVIDIA H100 80GB HBM3|NVIDIA H100 SXM\S*", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12,
        hbm=3.35e12, sms=132,
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS and TF32 989 with "
               "sparsity, FP32 67, HBM3 3.35 TB/s; dense 989.4 / 494.7 / 66.9 as in the NVIDIA H100 "
               "Tensor Core GPU Architecture whitepaper (H100 SXM5, 132 SMs)."),
    "H200": Peak(
        "H200 SXM", r"NVIDIA H200", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12, hbm=4.8e12, sms=132,
        source="NVIDIA H200 Tensor Core GPU datasheet, SXM column: HBM3e 4.8 TB/s; BF16 1,979 TFLOPS and "
               "TF32 989 with sparsity, FP32 67, the H100 SXM's rates and 132 SMs (same GH100 chip and clocks)."),
}


def gpu_for(device_name: str) -> Peak | None:
    """The peak table of one of the four GPUs, by CUDA device name; None for any other part
    (an H100 PCIe or an A100 40GB has other peaks and gets no percentage rather than a wrong one)."""
    return next((g for g in GPUS.values() if re.fullmatch(g.pattern, device_name.strip())), None)

# Programs that fill the largest target GPU once (H100 / H200: 132 SMs). Kernel launchers size
# their grids from it: a grid under one wave leaves SMs idle for the whole launch.
ONE_WAVE = max(g.sms for g in GPUS.values())
