"""Fused Triton kernels of sgengine (installed as ``sgengine.kernels``).

Each op lives in ``kernels/<op>.py`` with its private ``@triton.jit`` kernels,
a host launcher that checks shapes and dtypes, and ``<op>_ref`` in PyTorch.
Every entry point takes ``backend="auto"|"triton"|"torch"``.
"""
from ._backend import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
