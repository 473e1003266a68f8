"""Shared helpers for the pytest-benchmark suite (`pytest benchmarks --benchmark-only`).

Every benchmark times sgengine and its baseline on the same inputs, synchronises the
device inside the timed function, and records the GPU name, dtype and a derived
throughput in ``benchmark.extra_info``. Without a GPU only a tiny smoke size runs.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgengine.kernels._budget import max_err, within_budget  # noqa: E402 - after TRITON_INTERPRET

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu (smoke size only)"


def sizes(gpu_sizes: list, smoke_size) -> list:
    """The GPU sizes on a GPU, else one tiny size so the benchmark cannot rot."""
    return gpu_sizes if ON_GPU else [smoke_size]


def timed(fn):
    """Wrap ``fn`` so that the device is synchronised inside the timed call."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out
    return run


def peak_memory(fn, *args, **kwargs) -> float:
    """Peak device memory in GB allocated while running ``fn`` once (0 on CPU)."""
    if not ON_GPU:
        fn(*args, **kwargs)
        return 0.0
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args, **kwargs)
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def record(benchmark, **info) -> None:
    """Attach device, dtype and derived throughputs to the benchmark row."""
    benchmark.extra_info.update(device=device_name(), **info)


@pytest.fixture
def device():
    return DEVICE


def check_budget(benchmark, name: str, got, ref_low, truth, floor: float) -> None:
    """The error-budget rule on the device at the benchmark's size (compiled kernels, not the
    interpreter): recorded as ``<name>_max_err`` / ``<name>_ref_max_err`` and asserted."""
    err, ref_err = max_err(got, truth), max_err(ref_low, truth)
    benchmark.extra_info.update({f"{name}_max_err": err, f"{name}_ref_max_err": ref_err})
    assert within_budget(got, ref_low, truth, floor), f"{name}: error {err:.3g} > 2 x {ref_err:.3g} + {floor:g}"
