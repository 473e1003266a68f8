"""STEGO-style self-segments (Hamilton et al. 2022), on frozen patch features.

A segmentation head S (2-layer MLP with ReLU, D -> D -> 70) maps each patch feature f to a code
s. It is trained with STEGO's correspondence loss (eq. 3-4) on pairs of images (x, y):

    L_corr(x, y, b) = - mean_{p, q} clamp(S_pq, 0) (F^SC_pq - b),

F_pq = cos(f_p(x), f_q(y)) the frozen feature correlation, spatially centred (eq. 4: minus its
mean over q, plus its global mean back, the authors' "pointwise" option); S_pq = cos(s_p(x), s_q(y))
the code correlation, clamped at 0 (the authors' zero_clamp; this is the "shifted ReLU": codes
of patches whose features correlate more than the shift b are pulled together, the rest pushed
apart). Three pair types with the weights / shifts of the authors' ViT-S config:
self (x, x) 0.67 / 0.18; k-NN (x, one of its 7 nearest images by global feature) 0.25 / 0.12;
random (x, another image of the batch) 0.63 / 0.46.
Simplifications, documented: no parallel linear branch in the head and no dropout; all patches of
the grid are used (up to ``max_patches`` random ones, STEGO samples 11 x 11 points); no five-crop
augmentation. Optional dense-CRF refinement (``crf.py``, STEGO's constants, exact and in PyTorch).
After training, spherical k-means of the codes into K segments; masks are one-hot K-channel uint8
maps at training resolution (nearest upsampling of the patch grid) and the image-level multi-hot
vector is their spatial max-pool (SPEC section 1, self-segmented).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from .crf import CRFConfig, refine_segments
from .io import Annotations
from .kmeans import KMeans
from .temi import cosine_knn


@dataclass(frozen=True)
class StegoConfig:
    code_dim: int = 70
    knn: int = 7
    batch_size: int = 32
    steps: int = 2000
    lr: float = 5e-4
    self_weight: float = 0.67
    self_shift: float = 0.18
    knn_weight: float = 0.25
    knn_shift: float = 0.12
    rand_weight: float = 0.63
    rand_shift: float = 0.46
    max_patches: int = 121
    seed: int = 0


class SegmentationHead(nn.Module):
    """Patch features (..., D) -> codes (..., code_dim): Linear, ReLU, Linear."""

    def __init__(self, d: int, code_dim: int = 70):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, code_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp(f)


def correspondence_loss(f1, f2, c1, c2, shift: float) -> torch.Tensor:
    """STEGO eq. 3 with eq. 4's spatial centring: features f (B, P, D) frozen, codes c (B, P, E)."""
    with torch.no_grad():
        fd = torch.bmm(F.normalize(f1, dim=-1), F.normalize(f2, dim=-1).transpose(1, 2))
        mean = fd.mean()
        fd = fd - fd.mean(2, keepdim=True)
        fd = fd - fd.mean() + mean
    cd = torch.bmm(F.normalize(c1, dim=-1), F.normalize(c2, dim=-1).transpose(1, 2))
    return -(cd.clamp(min=0) * (fd - shift)).mean()


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point (n >= 2): a random cyclic shift of a shuffle."""
    perm = torch.randperm(n, generator=gen)
    shift = int(torch.randint(1, n, (1,), generator=gen))
    out = torch.empty_like(perm)
    out[perm] = perm.roll(shift)
    return out


class _Batches:
    """Random image batches, their k-NN partners and random patch subsets (one generator)."""

    def __init__(self, patches: torch.Tensor, nbrs: torch.Tensor, cfg: StegoConfig):
        self.patches, self.nbrs, self.cfg = patches, nbrs, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, device):
        n, p = self.patches.shape[:2]
        idx = torch.randperm(n, generator=self.gen)[:self.cfg.batch_size]
        pos = self.nbrs[idx, torch.randint(self.nbrs.shape[1], (len(idx),), generator=self.gen)]
        cols = torch.randperm(p, generator=self.gen)[:self.cfg.max_patches]
        take = lambda i: self.patches[i][:, cols].to(device).float()  # noqa: E731
        return take(idx), take(pos), _derangement(len(idx), self.gen).to(device)


def stego_loss(head: SegmentationHead, f: torch.Tensor, f_pos: torch.Tensor, neg: torch.Tensor,
               cfg: StegoConfig) -> torch.Tensor:
    """Weighted sum of the self, k-NN and random-pair correspondence losses of one batch."""
    c, c_pos = head(f), head(f_pos)
    return (cfg.self_weight * correspondence_loss(f, f, c, c, cfg.self_shift)
            + cfg.knn_weight * correspondence_loss(f, f_pos, c, c_pos, cfg.knn_shift)
            + cfg.rand_weight * correspondence_loss(f, f[neg], c, c[neg], cfg.rand_shift))


def train_stego(patches: torch.Tensor, global_features: torch.Tensor, cfg: StegoConfig = StegoConfig(),
                device=None, progress: bool = True) -> tuple[SegmentationHead, list[float]]:
    """Train the head on frozen patch features (N, P, D) with k-NN pairs from global features (N, D).
    Returns the head (on ``device``) and the loss of every step."""
    if len(patches) < 2 or len(patches) != len(global_features):
        raise ValueError(f"need >= 2 images with one global feature each; got patches {tuple(patches.shape)}, "
                         f"global features {tuple(global_features.shape)}")
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = SegmentationHead(patches.shape[-1], cfg.code_dim).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    batches = _Batches(patches, cosine_knn(global_features.to(device).float(), cfg.knn).cpu(), cfg)
    losses, bar = [], tqdm(range(cfg.steps), desc="STEGO head", disable=not progress)
    for _ in bar:
        loss = stego_loss(head, *batches(device), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return head, losses


@torch.no_grad()
def codes_of(head: SegmentationHead, patches: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised codes (N, P, E) float32 on CPU."""
    device = next(head.parameters()).device
    return torch.cat([F.normalize(head(patches[i:i + batch_size].to(device).float()), dim=-1).cpu()
                      for i in range(0, len(patches), batch_size)])


def fit_segments(codes: torch.Tensor, k: int, fit_rows: int = 200_000, seed: int = 0, device=None) -> KMeans:
    """Spherical k-means of the codes (N, P, E) into K segments, fit on at most ``fit_rows``
    random codes, on ``device`` (default: CUDA when available)."""
    device = resolve_device(device)
    flat = codes.reshape(-1, codes.shape[-1])
    sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:fit_rows]]
    return KMeans(flat.shape[1], k, niter=30, spherical=True, seed=seed).train(sample.to(device))


def assign_segments(km: KMeans, codes: torch.Tensor) -> torch.Tensor:
    """Segment ids (N, P) int64 on CPU: every code (N, P, E) assigned to its nearest centroid."""
    flat = codes.reshape(-1, codes.shape[-1]).to(km.centroids.device)
    return km.assign(flat)[0].view(codes.shape[:2]).long().cpu()


def segment_codes(codes: torch.Tensor, k: int, fit_rows: int = 200_000, seed: int = 0, device=None) -> torch.Tensor:
    """Segment ids (N, P) int64 on CPU: ``fit_segments`` then ``assign_segments``."""
    return assign_segments(fit_segments(codes, k, fit_rows, seed, device), codes)


def segment_probs(codes: torch.Tensor, centroids: torch.Tensor, grid, size: int, alpha: float = 2.0) -> torch.Tensor:
    """Per-pixel segment probabilities (N, K, size, size) for CRF refinement: codes bilinearly
    upsampled to the image, L2-normalised, softmax(alpha * cosine to each centroid) (STEGO's
    cluster probe with alpha = 2)."""
    h, w = (int(g) for g in grid)
    c = codes.view(len(codes), h, w, -1).permute(0, 3, 1, 2).float()
    c = F.normalize(F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False), dim=1)
    cent = F.normalize(centroids.float().cpu(), dim=1)
    return torch.softmax(alpha * torch.einsum("nehw,ke->nkhw", c, cent), dim=1)


def crf_masks(codes: torch.Tensor, centroids: torch.Tensor, grid, images: torch.Tensor, k: int, crf: CRFConfig,
              device=None, progress: bool = False, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_masks`` of CRF-refined per-pixel segments, ``chunk`` images at a time (the
    upsampled codes and probabilities of a whole data set would not fit in memory)."""
    size, parts = images.shape[-1], []
    for i in tqdm(range(0, len(codes), chunk), desc="CRF", disable=not progress):
        probs = segment_probs(codes[i:i + chunk], centroids, grid, size)
        parts.append(segment_masks(refine_segments(images[i:i + chunk], probs, crf, device), (size, size), k, size))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def segment_masks(segments: torch.Tensor, grid: tuple[int, int], k: int, size: int,
                  batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot layout (N, K, size, size) uint8 by nearest upsampling of the grid, multi-hot (N, K)
    float32 = the layout's spatial max-pool)."""
    h, w = (int(g) for g in grid)
    out = []
    for i in range(0, len(segments), batch_size):
        seg = segments[i:i + batch_size].view(-1, 1, h, w).float()
        up = F.interpolate(seg, size=(size, size), mode="nearest")[:, 0].long()
        out.append(F.one_hot(up, k).permute(0, 3, 1, 2).to(torch.uint8))
    layout = torch.cat(out)
    return layout, layout.amax(dim=(2, 3)).float()


def dominant_segment(layout: torch.Tensor) -> torch.Tensor:
    """The segment covering most pixels of each image (N,) int64: the image-level id."""
    return layout.sum(dim=(2, 3), dtype=torch.int64).argmax(1)


def segment_annotations(patches: torch.Tensor, features: torch.Tensor, grid, k: int, size: int, settings: dict,
                        cfg: StegoConfig = StegoConfig(), device=None, progress: bool = False,
                        images: torch.Tensor | None = None, crf: CRFConfig | None = None) -> Annotations:
    """Self-segmented guidance (SPEC section 1): one-hot K-channel layout, its multi-hot max-pool as
    the image-level vector, and the dominant segment as the image's id. With ``crf`` (and the
    training ``images`` (N, C, size, size) uint8) the segments are refined per pixel by a dense CRF."""
    if crf is not None and (images is None or tuple(images.shape[-2:]) != (size, size)):
        raise ValueError(f"CRF refinement needs the images at the training resolution ({size}x{size})")
    head, losses = train_stego(patches, features, cfg, device, progress)
    codes = codes_of(head, patches)
    km = fit_segments(codes, k, seed=cfg.seed, device=device)
    if crf is None:
        layout, multi_hot = segment_masks(assign_segments(km, codes), grid, k, size)
    else:
        layout, multi_hot = crf_masks(codes, km.centroids, grid, images, k, crf, device, progress)
    info = {"stego": dataclasses.asdict(cfg), "stego_loss_first": losses[0], "stego_loss_last": losses[-1],
            "crf": None if crf is None else dataclasses.asdict(crf)}
    return Annotations(dominant_segment(layout), k, cond=multi_hot, layout=layout, settings={**settings, **info})
