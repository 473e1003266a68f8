"""Fused Triton kernels of sgengine (installed as ``sgengine.kernels``).

Each op lives in ``kernels/<op>.py``: the entry point that checks shapes and dtypes, ``<op>_ref``
in PyTorch with the same signature, and a ``torch.library`` custom op (namespace ``sgengine``) so
``torch.compile`` traces it. Its ``@triton.jit`` kernels, tile configs and launcher live in
``kernels/_<op>_triton.py``, imported only when the Triton path runs: this package imports, and
``backend="auto"`` uses PyTorch, on a machine without triton. Every entry point takes
``backend="auto"|"triton"|"torch"``.
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
