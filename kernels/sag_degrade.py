"""The degraded input of self-attention guidance, in one fused pass.

Self-attention guidance (Hong et al., Eq. 18 and Alg. 1) blurs x0_hat only where the model's
self-attention is high and diffuses the result again with the model's own noise prediction:

    M      = nearest_upsample(mass > threshold)            (B, 1, H, W), same for all channels
    x0_bar = M * G_sigma(x0_hat) + (1 - M) * x0_hat          G: separable Gaussian, reflect padding
    x_deg  = a * x0_bar + b * eps                            where x_t = a * x0 + b * eps

(a, b) = (sqrt(abar_t), sqrt(1 - abar_t)) for DDPM, (1, sigma) for EDM, (t, 1 - (1 - sigma_min) t)
for flow matching, so the same op serves every sampler, not only alpha-cumprod ones.

The PyTorch chain is ~8 kernels (pad, two convolutions, upsample, where, two axpys, cast), each
reading and writing a full image. ``_sag_degrade_kernel`` reads x0, eps and the low-resolution
mass once and writes x_deg once. Each program owns one (image, channel) tile; its Gaussian blur is
two small GEMMs with banded Toeplitz weight matrices, Gv @ X @ Gh, over the tile plus a halo of r
pixels, and tiles where the mask is off everywhere skip the halo loads and the blur altogether.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import check_same_device, interpreter_on, resolve_backend
from ._tl import round_cast

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gauss(t, r, neg_inv_two_sigma2, inv_norm):
    """Banded Toeplitz weights: g[t] for tap t = ext - out in [0, 2r], else 0. g sums to 1."""
    d = (t - r).to(tl.float32)
    return tl.where((t >= 0) & (t <= 2 * r), tl.exp(d * d * neg_inv_two_sigma2) * inv_norm, 0.0)


@triton.jit
def _reflect(i, n):
    """Reflect padding without repeating the edge (as F.pad 'reflect'); valid for r < n."""
    i = tl.where(i < 0, -i, i)
    i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
    # Rows of the halo that feed only padded outputs may fall outside: keep addresses in bounds.
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _blur_tile(plane, sy, sx, H, W, y0, x0, r, neg_inv_two_sigma2, inv_norm,
               EXT_H: tl.constexpr, EXT_W: tl.constexpr, PRECISION: tl.constexpr):
    """Gaussian blur at outputs (y0 + o, x0 + o'): Gv @ X @ Gh over the tile with its r-halo."""
    e_h = tl.arange(0, EXT_H)
    e_w = tl.arange(0, EXT_W)
    rows = _reflect(y0 - r + e_h, H)
    cols = _reflect(x0 - r + e_w, W)
    tile = tl.load(plane + rows[:, None] * sy + cols[None, :] * sx).to(tl.float32)
    g_v = _gauss(e_h[None, :] - e_h[:, None], r, neg_inv_two_sigma2, inv_norm)  # [out, ext]
    g_h = _gauss(e_w[:, None] - e_w[None, :], r, neg_inv_two_sigma2, inv_norm)  # [ext, out]
    vertical = tl.dot(g_v, tile, input_precision=PRECISION)
    return tl.dot(vertical, g_h, input_precision=PRECISION)


@triton.jit
def _sag_degrade_kernel(X0, Eps, Mass, A, Bcoef, Out,
                        C, H, W, fy, fx, threshold, r, neg_inv_two_sigma2, inv_norm,
                        sxb, sxc, sxy, sxx, seb, sec, sey, sex, smb, smy, smx,
                        sob, soc, soy, sox,
                        EXT_H: tl.constexpr, EXT_W: tl.constexpr, PRECISION: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    """One program per (image*channel, tile row, tile column); EXT - 2r valid outputs per side."""
    b = tl.program_id(0) // C
    c = tl.program_id(0) % C
    y0 = tl.program_id(1) * (EXT_H - 2 * r)
    x0 = tl.program_id(2) * (EXT_W - 2 * r)
    oy = y0 + tl.arange(0, EXT_H)
    ox = x0 + tl.arange(0, EXT_W)
    ok_y = (tl.arange(0, EXT_H) < EXT_H - 2 * r) & (oy < H)
    ok_x = (tl.arange(0, EXT_W) < EXT_W - 2 * r) & (ox < W)
    ok = ok_y[:, None] & ok_x[None, :]
    # Nearest upsampling of the mask is an integer division of the pixel index.
    mass = tl.load(Mass + b * smb + (oy // fy)[:, None] * smy + (ox // fx)[None, :] * smx,
                   mask=ok, other=0.0)
    on = (mass.to(tl.float32) > threshold) & ok
    plane = X0 + b * sxb + c * sxc
    x0_hat = tl.load(plane + oy[:, None] * sxy + ox[None, :] * sxx, mask=ok, other=0.0)
    x0_hat = x0_hat.to(tl.float32)
    eps = tl.load(Eps + b * seb + c * sec + oy[:, None] * sey + ox[None, :] * sex,
                  mask=ok, other=0.0).to(tl.float32)
    blurred = x0_hat
    if tl.max(on.to(tl.int32)) > 0:
        blurred = _blur_tile(plane, sxy, sxx, H, W, y0, x0, r, neg_inv_two_sigma2, inv_norm,
                             EXT_H, EXT_W, PRECISION)
    x0_bar = tl.where(on, blurred, x0_hat)
    x_deg = tl.load(A + b) * x0_bar + tl.load(Bcoef + b) * eps
    tl.store(Out + b * sob + c * soc + oy[:, None] * soy + ox[None, :] * sox,
             round_cast(x_deg, Out.dtype.element_ty, INTERPRETED), mask=ok)


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


def _tile_extent(n: int, r: int) -> int:
    """Power-of-two tile side E (E - 2r outputs) that minimises tiles * E^3, the blur GEMM work;
    on a tie the larger tile, whose halo is a smaller share of its loads."""
    sides = (16, 32, 64) if interpreter_on() else (32, 64)  # >= 32: tensor-core friendly on GPU
    fits = [e for e in sides if e > 2 * r] or [triton.next_power_of_2(2 * r + 16)]
    return min(fits, key=lambda e: (triton.cdiv(n, e - 2 * r) * e ** 3, -e))


def _launch(x_t, x0, eps, mass, a, b, threshold: float, kernel_size: int, sigma: float):
    B, C, H, W = x_t.shape
    r = kernel_size // 2
    out = torch.empty((B, C, H, W), device=x_t.device, dtype=x_t.dtype)
    ext_h, ext_w = _tile_extent(H, r), _tile_extent(W, r)
    g_sum = sum(math.exp(-(t - r) ** 2 / (2.0 * sigma * sigma)) for t in range(kernel_size))
    grid = (B * C, triton.cdiv(H, ext_h - 2 * r), triton.cdiv(W, ext_w - 2 * r))
    _sag_degrade_kernel[grid](
        x0, eps, mass, a, b, out, C, H, W, H // mass.shape[1], W // mass.shape[2], threshold, r,
        -1.0 / (2.0 * sigma * sigma), 1.0 / g_sum, *x0.stride(), *eps.stride(), *mass.stride(),
        *out.stride(), EXT_H=ext_h, EXT_W=ext_w,
        # fp32-accurate blur on tensor cores (3 TF32 products); plain TF32 would cost ~1e-3.
        PRECISION="tf32x3", INTERPRETED=interpreter_on(),
        num_warps=8 if ext_h * ext_w >= 4096 else 4,
        # a * x0_bar + b * eps rounded as PyTorch rounds it (no FMA), so that an all-off mask
        # reproduces x_t = a * x0 + b * eps bit for bit.
        enable_fp_fusion=False)
    return out


@torch.library.custom_op("sgengine::sag_degrade", mutates_args=())
def _sag_degrade_op(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, mass: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor, threshold: float, kernel_size: int,
                    sigma: float) -> torch.Tensor:
    return _launch(x_t, x0, eps, mass, a, b, threshold, kernel_size, sigma)


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
        kernel_size, sigma: Gaussian blur, kernel_size odd with kernel_size // 2 < min(H, W).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        x_deg: (B, C, H, W) in x_t's dtype; the combination is computed in float32.
    """
    _check(x_t, x0, eps, kernel_size, sigma)
    B, _, H, W = x_t.shape
    mass = _mass_map(mass, B, H, W)
    check_same_device(x_t=x_t, x0=x0, eps=eps, mass=mass)
    if resolve_backend(backend, x_t, x0, eps, mass) == "torch":
        return sag_degrade_ref(x_t, x0, eps, mass, a, b, threshold, kernel_size, sigma)
    a, b = _per_sample("a", a, B, x_t), _per_sample("b", b, B, x_t)
    return _sag_degrade_op(x_t, x0, eps, mass, a, b, float(threshold), int(kernel_size),
                           float(sigma))
