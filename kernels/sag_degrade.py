"""The degraded input of self-attention guidance, in one fused pass.

Self-attention guidance (Hong et al., Eq. 18 and Alg. 1) blurs x0_hat only where the model's
self-attention is high and diffuses the result again with the model's own noise prediction:

    M      = nearest_upsample(mass > threshold)            (B, 1, H, W), same for all channels
    x0_bar = M * G_sigma(x0_hat) + (1 - M) * x0_hat          G: separable Gaussian, reflect padding
    x_deg  = a * x0_bar + b * eps                            where x_t = a * x0 + b * eps

(a, b) = (sqrt(abar_t), sqrt(1 - abar_t)) for DDPM, (1, sigma) for EDM, (t, 1 - (1 - sigma_min) t)
for flow matching, so the same op serves every sampler, not only alpha-cumprod ones.

The PyTorch chain is ~8 kernels (pad, two convolutions, upsample, where, two axpys, cast), each
reading and writing a full image. ``_sag_degrade_kernel`` (in ``_sag_degrade_triton``, imported
only when the Triton path runs) reads x0, eps and the low-resolution mass once and writes x_deg
once. Each program owns one (image, channel) tile; its Gaussian blur is small GEMMs with banded
Toeplitz weight matrices, Gv @ X @ Gh, over the tile plus a halo of r pixels, and tiles where the
mask is off everywhere skip the halo loads and the blur altogether.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import check_same_device, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The Triton kernel's tiles are at most 64 x 64 (larger ones spill registers): blur radius < 32.
_TRITON_MAX_KERNEL = 63


def _mass_map(mass: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
    """View mass (B, h*w) or (B, h, w) as (B, h, w); h, w must divide H, W."""
    if mass.dim() == 2:
        f = math.isqrt(H * W // max(mass.shape[1], 1))
        if f == 0 or (H % f or W % f or (H // f) * (W // f) != mass.shape[1]):
            raise ValueError(f"cannot infer the attention grid of mass {tuple(mass.shape)} for a "
                             f"{H}x{W} image: pass mass as (B, h, w)")
        mass = mass.reshape(mass.shape[0], H // f, W // f)
    if mass.dim() != 3 or mass.shape[0] != B:
        raise ValueError(f"mass must be (B, h*w) or (B, h, w) with B={B}, got {tuple(mass.shape)}")
    if not mass.is_floating_point():
        raise TypeError(f"mass must be a float tensor, got {mass.dtype}")
    h, w = mass.shape[1:]
    if h == 0 or w == 0 or H % h or W % w:
        raise ValueError(f"the attention grid {h}x{w} must divide the image {H}x{W} "
                         "(nearest upsampling by an integer factor)")
    return mass


def _per_sample(name: str, coef, B: int, like: torch.Tensor) -> torch.Tensor:
    """A float, a one-element tensor or B values -> (B,) float32 on like's device."""
    coef = torch.as_tensor(coef, dtype=torch.float32, device=like.device)
    if coef.numel() == 1:
        return coef.reshape(1).expand(B).contiguous()
    if coef.numel() != B:
        raise ValueError(f"{name} must be a float or hold B={B} values, "
                         f"got shape {tuple(coef.shape)}")
    return coef.reshape(B).contiguous()


def _check(x_t, x0, eps, kernel_size: int, sigma: float) -> None:
    for name, t in (("x_t", x_t), ("x0", x0), ("eps", eps)):
        if t.dim() != 4 or t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be a (B, C, H, W) float16/bfloat16/float32 tensor, "
                             f"got shape {tuple(t.shape)} dtype {t.dtype}")
    if not (x_t.shape == x0.shape == eps.shape):
        raise ValueError(f"x_t, x0, eps must have one shape, got {tuple(x_t.shape)}, "
                         f"{tuple(x0.shape)}, {tuple(eps.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0 or not sigma > 0:
        raise ValueError(f"kernel_size must be odd and positive and sigma > 0, got "
                         f"kernel_size={kernel_size}, sigma={sigma}")
    H, W = x_t.shape[2:]
    if kernel_size // 2 >= min(H, W):
        raise ValueError(f"reflect padding needs kernel_size // 2 < H and W; kernel_size "
                         f"{kernel_size} is too large for a {H}x{W} image: "
                         f"use at most {2 * min(H, W) - 1}")


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """(kernel_size,) weights exp(-t^2 / (2 sigma^2)), t = -r..r, normalised to sum 1 (as
    torchvision's gaussian_blur, which the SAG paper used)."""
    t = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_blur_ref(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel separable Gaussian blur of x (B, C, H, W) with reflect padding, returned in x's
    dtype. 16-bit inputs are blurred in fp32 and rounded once: torch 2.14.1's oneDNN never returns
    from a float16 depthwise conv2d with a 1 x k kernel on the CPU, and one rounding is also the
    more accurate reference."""
    C, r = x.shape[1], kernel_size // 2
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = gaussian_kernel1d(kernel_size, sigma, work.dtype, x.device)
    y = F.pad(work, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(y, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C).to(x.dtype)


def sag_degrade_ref(x_t, x0, eps, mass, a, b, threshold: float = 1.0, kernel_size: int = 9,
                    sigma: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """The PyTorch chain of ops; arguments as :func:`sag_degrade` (``backend`` is ignored)."""
    _check(x_t, x0, eps, kernel_size, sigma)
    B, _, H, W = x_t.shape
    m = _mass_map(mass, B, H, W)
    on = (m.float() > threshold)[:, None]
    on = on.repeat_interleave(H // m.shape[1], dim=2).repeat_interleave(W // m.shape[2], dim=3)
    x0_bar = torch.where(on, gaussian_blur_ref(x0, kernel_size, sigma), x0)
    a, b = (_per_sample(n, c, B, x_t).view(B, 1, 1, 1) for n, c in (("a", a), ("b", b)))
    return (a * x0_bar.float() + b * eps.float()).to(x_t.dtype)


@torch.library.custom_op("sgengine::sag_degrade", mutates_args=())
def _sag_degrade_op(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, mass: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor, threshold: float, kernel_size: int,
                    sigma: float) -> torch.Tensor:
    from ._sag_degrade_triton import launch  # triton is imported by the Triton path only

    return launch(x_t, x0, eps, mass, a, b, threshold, kernel_size, sigma)


@_sag_degrade_op.register_fake
def _(x_t, x0, eps, mass, a, b, threshold, kernel_size, sigma):
    return x_t.new_empty(x_t.shape)


def sag_degrade(x_t, x0, eps, mass, a, b, threshold: float = 1.0, kernel_size: int = 9,
                sigma: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Degraded SAG input x_deg = a * (M * blur(x0) + (1 - M) * x0) + b * eps.

    Args:
        x_t: (B, C, H, W) current sample; fixes the output's shape, dtype and device.
        x0: (B, C, H, W) predicted clean sample x0_hat; eps: (B, C, H, W) predicted noise.
            float16, bfloat16 or float32, dtypes may differ; any strides.
        mass: (B, h*w) or (B, h, w) per-key attention mass (from ``attention_with_key_mass``) at
            an attention resolution with H % h == 0 and W % w == 0 (a flat (B, h*w) needs
            H / h == W / w to be inferred).
        a, b: (B,) float32 (or floats) with x_t = a * x0 + b * eps for the sampler's process.
        threshold: M = mass > threshold (1.0: more than the mean attention for self-attention).
        kernel_size, sigma: Gaussian blur, kernel_size odd with kernel_size // 2 < min(H, W);
            the Triton kernel takes kernel_size <= 63 ("auto" uses PyTorch above that).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        x_deg: (B, C, H, W) in x_t's dtype; the combination is computed in float32.
    """
    _check(x_t, x0, eps, kernel_size, sigma)
    B, _, H, W = x_t.shape
    mass = _mass_map(mass, B, H, W)
    check_same_device(x_t=x_t, x0=x0, eps=eps, mass=mass)
    resolved = resolve_backend(backend, x_t, x0, eps, mass)
    if resolved == "torch" or (backend == "auto" and kernel_size > _TRITON_MAX_KERNEL):
        return sag_degrade_ref(x_t, x0, eps, mass, a, b, threshold, kernel_size, sigma)
    if kernel_size > _TRITON_MAX_KERNEL:
        raise ValueError(f"kernel_size {kernel_size} > {_TRITON_MAX_KERNEL} is not supported by "
                         "the Triton kernel: use backend='torch' or 'auto'")
    a, b = _per_sample("a", a, B, x_t), _per_sample("b", b, B, x_t)
    return _sag_degrade_op(x_t, x0, eps, mass, a, b, float(threshold), int(kernel_size),
                           float(sigma))
