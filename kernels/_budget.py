"""The error-budget rule every kernel is checked by (tests on CPU, benchmarks on the GPU).

A kernel run in low precision is compared with the PyTorch reference run in the same precision
and with the truth (the reference in float64 on the same, already rounded, inputs). It passes
when its error is at most twice the reference's own low-precision error plus a small floor:
the kernel may round differently, but not worse than the plain PyTorch path does.
"""
from __future__ import annotations

import torch


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """max |x - truth| in float64."""
    return (x.double() - truth.double()).abs().max().item()


def rounding_floor(dtype: torch.dtype, truth: torch.Tensor) -> float:
    """Half an ulp of ``dtype`` at the truth's largest value: one rounding of the output is
    unavoidable, and it alone decides the error of a kernel that computes in fp32."""
    return torch.finfo(dtype).eps * truth.abs().max().item() / 2


def within_budget(got: torch.Tensor, ref_low: torch.Tensor, truth: torch.Tensor, floor: float) -> bool:
    """max_err(got) <= 2 * max_err(ref_low) + floor."""
    return max_err(got, truth) <= 2 * max_err(ref_low, truth) + floor
