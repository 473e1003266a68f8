"""benchmarks/roofline.py: the FLOP and byte formulas, the bounds and the GPU table, exactly."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sgengine.models.unet import UNET_PRESETS, UNet

SPEC = importlib.util.spec_from_file_location("roofline", Path(__file__).parents[1] / "benchmarks" / "roofline.py")
roofline = importlib.util.module_from_spec(SPEC)
sys.modules.setdefault("roofline", roofline)
SPEC.loader.exec_module(roofline)
H100, A5000 = roofline.GPUS["H100"], roofline.GPUS["A5000"]


def test_formulas_count_flops_and_bytes_exactly():
    att = roofline.attention(B=2, H=3, N=4, D=8, elem_bytes=2, mass=True)
    assert (att.flops, att.bytes) == (4 * 2 * 3 * 4 * 4 * 8, 4 * 2 * 3 * 4 * 8 * 2 + 4 * 2 * 4)
    assert roofline.attention(2, 3, 4, 8, 2, mass=False).bytes == 4 * 2 * 3 * 4 * 8 * 2
    rows = roofline.attention_rows(B=2, H=3, Nq=4, Nk=6, D=8, elem_bytes=2, mass=True)  # image rows of [img; txt]
    assert (rows.flops, rows.bytes) == (4 * 2 * 3 * 4 * 6 * 8, 2 * 3 * 8 * (2 * 4 + 2 * 6) * 2 + 4 * 2 * 6)
    deg = roofline.sag_degrade(B=1, C=3, H=4, W=4, side=2, kernel_size=3, elem_bytes=4)
    assert (deg.flops, deg.bytes) == (48 * (4 * 3 + 3), 3 * 48 * 4 + 4 * 2 * 2 + 8)
    km = roofline.lloyd(N=10, d=4, K=3, elem_bytes=2, units=roofline.MATMUL_UNITS[2])
    assert (km.flops, km.bytes) == (2 * 10 * 3 * 4 + 10 * 4, 10 * 4 * 2 + 2 * 3 * 4 * 4)
    sk = roofline.sinkhorn(B=2, K=5, iters=3, elem_bytes=2)
    assert (sk.flops, sk.bytes) == (10 * (3 + 12), 10 * (2 + 4))
    assert [(w.flops, w.bytes) for w in (roofline.sample_step(100, 4, 10, k) for k in ("plain", "cfg", "sag"))] == \
        [(400, 40), (800, 40), (1200, 80)]
    guided = roofline.guided_passes(100, 2, 10, passes=3, elem_bytes=2)
    assert (guided.flops, guided.bytes) == (600, 60)
    assert (roofline.train_step(300, 2, 10).flops, roofline.train_step(300, 2, 10).bytes) == (600, 280)


def test_bound_is_the_slower_of_compute_and_memory():
    w = roofline.Work(flops=989.4e12 * 2e-3, bytes=3.35e12 * 1e-3)  # 2 ms of bf16 math, 1 ms of traffic
    assert w.compute_s(H100) == pytest.approx(2e-3) and w.memory_s(H100) == pytest.approx(1e-3)
    assert w.bound_s(H100) == pytest.approx(2e-3) and w.limiter(H100) == "compute"
    light = dataclasses.replace(w, flops=1.0)
    assert light.bound_s(H100) == pytest.approx(1e-3) and light.limiter(H100) == "memory"
    # float32 math: the cheaper of plain fp32 and tf32x3 (three TF32 products) on each GPU
    fp32 = roofline.Work(1e12, 0, roofline.FP32_UNITS)
    assert fp32.compute_s(A5000) == pytest.approx(1e12 / 27.8e12)  # 55.6 / 3 < 27.8
    assert fp32.compute_s(H100) == pytest.approx(3e12 / 494.7e12)  # 494.7 / 3 > 66.9


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA RTX A5000", "A5000"), ("NVIDIA H100 PCIe", None), ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA A100 80GB PCIe", None), ("cpu (smoke size only)", None)])
def test_only_the_four_gpus_get_peaks(name, key):
    assert roofline.gpu_for(name) is (roofline.GPUS[key] if key else None)


def test_rows_report_their_share_of_the_bound():
    w = roofline.Work(flops=989.4e12 * 1e-3, bytes=0)  # 1 ms on an H100
    info = roofline.roofline_info(w, "NVIDIA H100 80GB HBM3", seconds=4e-3)
    assert info["roofline_pct"] == pytest.approx(25.0) and info["bound_ms"] == pytest.approx(1.0)
    assert info["bound_by"] == "compute" and info["roofline_gpu"] == "H100 SXM"
    assert roofline.roofline_info(w, "cpu", 4e-3) == {"flops": w.flops, "bytes": 0}
    assert "roofline_pct" not in roofline.roofline_info(w, "NVIDIA H200", None)  # untimed row


def test_unet_flops_on_meta_match_a_real_forward():
    cfg = UNET_PRESETS["tiny"]
    flops, params = roofline.unet_flops(cfg, 10)
    net = UNet(dataclasses.replace(cfg, num_classes=10))
    # The math attention backend: the counter has no formula for the CPU flash kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        net(torch.randn(1, cfg.in_channels, cfg.img_size, cfg.img_size), torch.full((1,), 500.0), y=torch.zeros(1, 10))
    assert flops == counter.get_total_flops() > 0 and params == sum(p.numel() for p in net.parameters())
    train, _ = roofline.unet_flops(cfg, 10, train=True)
    assert 2.9 * flops < train <= 3 * flops  # backward: 2x, less the input gradient of the first conv


def test_spec_table_matches_spec_section_5():
    cases = {name: work for name, work, _ in roofline.spec_cases()}
    # SPEC section 5: the ImageNet32 UNet costs 51 GFLOP per training image at 32x32.
    assert cases["train in32, batch 128"].flops / 128 == pytest.approx(51e9, rel=0.02)
    table = roofline.markdown(roofline.spec_cases())
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(cases) + 1 + len(roofline.GPUS)  # header, cases, header, peaks
    assert "| SDPA 0.12 (29%) |" in table  # 34.4 GFLOP at 989.4 TFLOP/s = 34.7 us of 120 us
