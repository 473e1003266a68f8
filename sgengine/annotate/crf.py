"""Fully connected CRF refinement of segment probabilities (Kraehenbuehl & Koltun 2011), as STEGO's
``dense_crf`` post-processing, in PyTorch (no pydensecrf).

Mean-field inference with Potts compatibility on two Gaussian kernels over pixels i, j:

    appearance  k_a(i, j) = exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_b^2)   (weight w_a)
    smoothness  k_s(i, j) = exp(-|p_i - p_j|^2 / 2 theta_g^2)                                (weight w_s)
    Q <- softmax(log P + sum_m w_m D_m^-1/2 K_m D_m^-1/2 Q),   D_m = diag(K_m 1)

the update of Krähenbühl & Koltun's Algorithm 1 with pydensecrf's defaults: unary -log P (P
clipped at 1e-5), symmetric kernel normalisation, self term included as in its lattice filter.
pydensecrf approximates K_m Q with a permutohedral lattice; here it is exact: an
N x N matrix held once per batch of images (``_Held``) when it fits KERNEL_ENTRIES, else rebuilt
in row blocks each iteration (``_Streamed``: ``block`` rows at a time, O(block * N) memory). Cheap at
diffusion training resolutions (32^2 - 64^2 pixels) and fast on a GPU.
Defaults are STEGO's (crf.py: 10 iterations, w_s=3, theta_g=1, w_a=4, theta_a=67, theta_b=3, image
in 0..255 units); theta in pixels of the image given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..device import resolve_device

UNARY_CLIP = 1e-5  # pydensecrf's unary_from_softmax clip
KERNEL_ENTRIES = 2**24  # kernel block entries held at once (64 MB in fp32), images batched up to it


@dataclass(frozen=True)
class CRFConfig:
    iters: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    block: int = 2048


def _grid(h: int, w: int, device) -> torch.Tensor:
    """Pixel positions (h*w, 2) float32, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys, xs], -1).reshape(-1, 2).float()


def _gauss(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """exp(-|fa_i - fb_j|^2 / 2): (B, n, d), (B, N, d) -> (B, n, N)."""
    return torch.exp(-0.5 * torch.cdist(fa, fb).square())


def _filter(f: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
    """K v per image for K = _gauss(f, f); f (B, N, d), v (B, N, c); ``block`` rows of K at a time."""
    return torch.cat([_gauss(f[:, s:s + block], f) @ v for s in range(0, f.shape[1], block)], 1)


class _Streamed:
    """Pairwise messages sum_m w_m D_m^-1/2 K_m D_m^-1/2 q, K_m rebuilt by row blocks at every
    call: O(block * N) memory, for images too large to hold K."""

    def __init__(self, terms: list[tuple[torch.Tensor, float]], block: int):
        self.terms, self.block = terms, block
        self.norms = [_filter(f, f.new_ones(*f.shape[:2], 1), block).rsqrt() for f, _ in terms]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return sum(w * n * _filter(f, n * q, self.block) for (f, w), n in zip(self.terms, self.norms))


class _Held:
    """The same messages from one precomputed (B, N, N) matrix: the kernels' exponentials are
    computed once instead of once per iteration."""

    def __init__(self, terms: list[tuple[torch.Tensor, float]]):
        self.matrix = 0
        for f, w in terms:
            k = _gauss(f, f)
            n = k.sum(2, keepdim=True).rsqrt()
            self.matrix = self.matrix + w * n * k * n.transpose(1, 2)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.matrix @ q


def _check(images: torch.Tensor, probs: torch.Tensor) -> None:
    if images.dim() != 4 or probs.dim() != 4 or images.shape[-2:] != probs.shape[-2:] or len(images) != len(probs):
        raise ValueError(f"dense_crf needs image (C, H, W) and probs (K, H, W) of the same H, W (or batches of "
                         f"each); got {tuple(images.shape)} and {tuple(probs.shape)} (upsample the probabilities first)")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("dense_crf: probs must be finite and non-negative (softmax outputs)")


@torch.no_grad()
def _mean_field(images: torch.Tensor, probs: torch.Tensor, cfg: CRFConfig) -> torch.Tensor:
    """Batched inference: images (B, C, H, W), probs (B, K, H, W) -> Q (B, K, H, W) float32."""
    _check(images, probs)
    b, k, h, w = probs.shape
    pos = _grid(h, w, probs.device).expand(b, -1, -1)
    colour = images.reshape(b, images.shape[1], -1).transpose(1, 2).float().to(probs.device)
    terms = [(pos / cfg.pos_xy_std, cfg.pos_w), (torch.cat([pos / cfg.bi_xy_std, colour / cfg.bi_rgb_std], 2), cfg.bi_w)]
    message = _Held(terms) if b * h * w * h * w <= KERNEL_ENTRIES else _Streamed(terms, cfg.block)
    logp = probs.reshape(b, k, -1).transpose(1, 2).float().clamp(min=UNARY_CLIP).log()  # -unary, (B, N, K)
    q = torch.softmax(logp, 2)
    for _ in range(cfg.iters):
        q = torch.softmax(logp + message(q), 2)
    return q.transpose(1, 2).reshape(b, k, h, w)


def dense_crf(image: torch.Tensor, probs: torch.Tensor, cfg: CRFConfig = CRFConfig()) -> torch.Tensor:
    """Refined probabilities Q (K, H, W) float32 from ``image`` (C, H, W) in 0..255 (uint8 or
    float, any C: RGB, grey) and class probabilities ``probs`` (K, H, W)."""
    if image.dim() != 3 or probs.dim() != 3:
        raise ValueError(f"dense_crf needs image (C, H, W) and probs (K, H, W); got {tuple(image.shape)} and "
                         f"{tuple(probs.shape)}")
    return _mean_field(image[None], probs[None], cfg)[0]


def refine_segments(images: torch.Tensor, probs: torch.Tensor, cfg: CRFConfig = CRFConfig(),
                    device=None, progress: bool = False) -> torch.Tensor:
    """Segment ids (N, H, W) int64 on CPU: argmax of the CRF's Q per image. images (N, C, H, W)
    uint8 (0..255), probs (N, K, H, W); images go in batches of ~KERNEL_ENTRIES kernel entries."""
    if len(images) != len(probs):
        raise ValueError(f"{len(images)} images but {len(probs)} probability maps")
    device = resolve_device(device)
    n = probs.shape[-2] * probs.shape[-1]
    step = max(1, KERNEL_ENTRIES // (n * n))  # images whose full kernels fit; larger ones stream alone
    out = [_mean_field(images[i:i + step].to(device), probs[i:i + step].to(device), cfg).argmax(1).cpu()
           for i in tqdm(range(0, len(images), step), desc="CRF", disable=not progress)]
    return torch.cat(out).long()
