"""Triton path of :func:`sgengine.kernels.sag_degrade.sag_degrade` (imported only when it runs).

``_sag_degrade_kernel``: one program per (image, channel) tile reads x0, eps and the
low-resolution mass once and writes x_deg once. Its Gaussian blur is Gv @ X @ Gh with banded
Toeplitz weights over the tile plus a halo of r pixels, evaluated as a sum over chunks of
BLOCK_R x BLOCK_R blocks of the halo tile:

    blur = sum_c (sum_r Gv[:, r] @ X[r, c]) @ Gh[c, :]

so every dot has an inner dimension of BLOCK_R, and no weight matrix is held whole. Why: tensor-core dot
operands live in registers for their whole inner dimension, and the fp32-accurate blur splits
each operand into two TF32 halves (tf32x3); at EXT = 64 one full-size dot alone needed ~200
registers a thread, and the kernel spilled up to 1.8 KB. Blocks of 16 keep it well inside
the register file. Tiles where the mask is off everywhere skip the halo loads and the blur.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common.gpus import ONE_WAVE
from ._backend import interpreter_on
from ._tl import round_cast


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
def _vertical(plane, sy, sx, H, y0, r, cols, neg_inv_two_sigma2, inv_norm,
              EXT_H: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """Gv @ X[:, cols] -> [EXT_H, BLOCK_R]: vertical blur of a chunk of halo columns, summed
    over chunks of halo rows (the weights of each chunk are recomputed, not held)."""
    out_h = tl.arange(0, EXT_H)
    vertical = tl.zeros([EXT_H, BLOCK_R], tl.float32)
    for r0 in range(0, EXT_H, BLOCK_R):
        e_h = r0 + tl.arange(0, BLOCK_R)
        rows = _reflect(y0 - r + e_h, H)
        chunk = tl.load(plane + rows[:, None] * sy + cols[None, :] * sx).to(tl.float32)
        g_v = _gauss(e_h[None, :] - out_h[:, None], r, neg_inv_two_sigma2, inv_norm)  # [out, r]
        vertical = tl.dot(g_v, chunk, vertical, input_precision=PRECISION)
    return vertical


@triton.jit
def _blur_tile(plane, sy, sx, H, W, y0, x0, r, neg_inv_two_sigma2, inv_norm,
               EXT_H: tl.constexpr, EXT_W: tl.constexpr, BLOCK_R: tl.constexpr,
               PRECISION: tl.constexpr):
    """Gaussian blur at outputs (y0 + o, x0 + o'): sum over halo-column chunks c of
    (Gv @ X[:, c]) @ Gh[c, :], X the tile with its r-halo (reflected at the image border)."""
    out_w = tl.arange(0, EXT_W)
    acc = tl.zeros([EXT_H, EXT_W], tl.float32)
    for c0 in range(0, EXT_W, BLOCK_R):
        e_w = c0 + tl.arange(0, BLOCK_R)
        cols = _reflect(x0 - r + e_w, W)
        vertical = _vertical(plane, sy, sx, H, y0, r, cols, neg_inv_two_sigma2, inv_norm,
                             EXT_H, BLOCK_R, PRECISION)
        g_h = _gauss(e_w[:, None] - out_w[None, :], r, neg_inv_two_sigma2, inv_norm)  # [c, out]
        acc = tl.dot(vertical, g_h, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _sag_degrade_kernel(X0, Eps, Mass, A, Bcoef, Out,
                        C, H, W, fy, fx, threshold, r, neg_inv_two_sigma2, inv_norm,
                        sxb, sxc, sxy, sxx, seb, sec, sey, sex, smb, smy, smx,
                        sob, soc, soy, sox,
                        EXT_H: tl.constexpr, EXT_W: tl.constexpr, BLOCK_R: tl.constexpr,
                        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
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
    # x0 and eps are loaded after the blur, so they do not sit in registers through it.
    x0_bar = tl.zeros([EXT_H, EXT_W], tl.float32)
    if tl.max(on.to(tl.int32)) > 0:
        x0_bar = _blur_tile(plane, sxy, sxx, H, W, y0, x0, r, neg_inv_two_sigma2, inv_norm,
                            EXT_H, EXT_W, BLOCK_R, PRECISION)
    x0_hat = tl.load(plane + oy[:, None] * sxy + ox[None, :] * sxx, mask=ok, other=0.0)
    x0_bar = tl.where(on, x0_bar, x0_hat.to(tl.float32))
    eps = tl.load(Eps + b * seb + c * sec + oy[:, None] * sey + ox[None, :] * sex,
                  mask=ok, other=0.0).to(tl.float32)
    x_deg = tl.load(A + b) * x0_bar + tl.load(Bcoef + b) * eps
    tl.store(Out + b * sob + c * soc + oy[:, None] * soy + ox[None, :] * sox,
             round_cast(x_deg, Out.dtype.element_ty, INTERPRETED), mask=ok)


# Programs a launch aims for: two waves of an H100's 132 SMs (A100 108, A5000 64).
_MIN_PROGRAMS = 2 * ONE_WAVE


def _tile_extent(n: int, r: int, sides: tuple) -> int:
    """Power-of-two tile side E (E - 2r outputs) that minimises tiles * E^3, the blur GEMM work;
    on a tie the larger tile, whose halo is a smaller share of its loads."""
    fits = [e for e in sides if e > 2 * r]
    return min(fits, key=lambda e: (triton.cdiv(n, e - 2 * r) * e ** 3, -e))


def _extents(planes: int, H: int, W: int, r: int) -> tuple:
    """(EXT_H, EXT_W): sides of 32 or 64 on a GPU (tensor-core friendly), and 16 as well when
    that grid would be under _MIN_PROGRAMS (small batches: B=2 C=4 64x64 gives 72 programs at
    32, 512 at 16) or under the interpreter (small test images still get several tiles)."""
    ext = _tile_extent(H, r, (32, 64)), _tile_extent(W, r, (32, 64))
    programs = planes * triton.cdiv(H, ext[0] - 2 * r) * triton.cdiv(W, ext[1] - 2 * r)
    if interpreter_on() or (programs < _MIN_PROGRAMS and 16 > 2 * r):
        ext = _tile_extent(H, r, (16, 32, 64)), _tile_extent(W, r, (16, 32, 64))
    return ext


def launch(x_t, x0, eps, mass, a, b, threshold: float, kernel_size: int, sigma: float):
    """Run the kernel: mass (B, h, w) float, a and b (B,) fp32 on the images' device,
    kernel_size // 2 <= 31: tiles are at most 64 x 64 (larger ones spill registers)."""
    B, C, H, W = x_t.shape
    r = kernel_size // 2
    out = torch.empty((B, C, H, W), device=x_t.device, dtype=x_t.dtype)
    ext_h, ext_w = _extents(B * C, H, W, r)
    g_sum = sum(math.exp(-(t - r) ** 2 / (2.0 * sigma * sigma)) for t in range(kernel_size))
    grid = (B * C, triton.cdiv(H, ext_h - 2 * r), triton.cdiv(W, ext_w - 2 * r))
    _sag_degrade_kernel[grid](
        x0, eps, mass, a, b, out, C, H, W, H // mass.shape[1], W // mass.shape[2], threshold, r,
        -1.0 / (2.0 * sigma * sigma), 1.0 / g_sum, *x0.stride(), *eps.stride(), *mass.stride(),
        *out.stride(), EXT_H=ext_h, EXT_W=ext_w, BLOCK_R=16,
        # fp32-accurate blur on tensor cores (3 TF32 products); plain TF32 would cost ~1e-3.
        PRECISION="tf32x3", INTERPRETED=interpreter_on(),
        num_warps=4 if ext_h * ext_w <= 512 else 8, num_stages=2,
        # Without .maxnreg ptxas held these kernels at 128 registers and spilled (fp32, sm_86/89).
        maxnreg=255,
        # a * x0_bar + b * eps rounded as PyTorch rounds it (no FMA), so that an all-off mask
        # reproduces x_t = a * x0 + b * eps bit for bit.
        enable_fp_fusion=False)
    return out
