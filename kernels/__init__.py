"""Fused Triton kernels of sgengine (installed as ``sgengine.kernels``).

Each op lives in ``kernels/<op>.py`` with its private ``@triton.jit`` kernels, a host launcher
that checks shapes and dtypes, and ``<op>_ref`` in PyTorch with the same signature. Every entry
point takes ``backend="auto"|"triton"|"torch"``; each is registered as a ``torch.library``
custom op (namespace ``sgengine``) so ``torch.compile`` traces it.
"""
from ._backend import BACKENDS, resolve_backend
from .attention_key_mass import attention_with_key_mass, attention_with_key_mass_ref
from .kmeans import kmeans_assign, kmeans_assign_ref
from .sag_degrade import gaussian_blur_ref, gaussian_kernel1d, sag_degrade, sag_degrade_ref
from .sinkhorn import sinkhorn, sinkhorn_ref

__all__ = [
    "BACKENDS", "resolve_backend", "attention_with_key_mass", "attention_with_key_mass_ref",
    "kmeans_assign", "kmeans_assign_ref", "sag_degrade", "sag_degrade_ref", "gaussian_blur_ref",
    "gaussian_kernel1d", "sinkhorn", "sinkhorn_ref",
]
