"""Backend dispatch shared by every kernel entry point.

``backend="auto"`` picks Triton for CUDA tensors and PyTorch for CPU tensors;
``"triton"`` on CPU tensors runs under the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before Triton is first imported.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for these tensors, or raise a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not on_cuda and not interpreter_on():
            raise RuntimeError(
                "backend='triton' on CPU tensors runs under the Triton interpreter: "
                "export TRITON_INTERPRET=1 before importing sgengine, or use backend='torch'"
            )
    return backend


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
