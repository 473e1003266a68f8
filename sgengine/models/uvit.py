"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023).

Every input is a token: the time t, the condition c (a prototype vector of the online
self-guidance paper, SPEC section 2, or the learned null token for CFG) and a CLS token are
prepended to the p x p patch tokens of x; learned positional embeddings are added to all. The
depth = 2n + 1 pre-LN transformer blocks are n in-blocks, one mid-block and n out-blocks; out-block
i takes the output of in-block n - 1 - i through a long skip, concat then Linear(2d, d) (U-ViT
Fig. 1, "(#Blocks - 1) / 2 long skip connections"). Then LayerNorm, Linear to p*p*C values per
patch, unpatchify, and an optional 3x3 conv.

Attention goes through ``sgengine.models.attention.MultiHeadAttention``, whose per-instance
``attend`` hook lets guidance (SAG) read attention maps. ``return_features=True`` also returns
the mid-block tokens: "cls" (B, d), whose online Sinkhorn clustering gives the guidance, and
"patches" (B, N, d) for the patch-level variant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..common.flags import Count, Positive, validate
from .attention import MultiHeadAttention
from .unet import timestep_embedding

_EXTRAS = 3  # time, condition and CLS tokens before the patches
_CLS = 2  # index of the CLS token


@dataclass(frozen=True)
class UViTConfig:
    img_size: Count = 32
    in_channels: Count = 3
    patch: Count = 2
    dim: Count = 512
    depth: Count = 13  # all transformer blocks: (depth - 1) / 2 in, 1 mid, (depth - 1) / 2 out
    heads: Count = 8
    mlp_ratio: Positive = 4.0
    cond_dim: Count | None = None  # size of the condition vector y (a prototype); None: dim
    conv: bool = False  # 3x3 conv after unpatchify (the paper's Table 4: off)
    mlp_time_embed: bool = False  # U-ViT's optional MLP on the sinusoidal time embedding
    time_scale: Positive = 1000.0  # flow time t in [0, 1] -> t * 1000, the range sinusoids resolve
    skip: bool = True  # the long skip connections (False: a plain ViT, for ablations)
    feature_block: int | None = None  # block (0-based) whose tokens are the features; None: mid
    patch_cond: bool = False  # accept per-patch condition vectors (patch-level self-guidance)

    def __post_init__(self):
        validate(self)  # ranges first: the checks below divide by them
        if self.depth % 2 == 0:
            raise ValueError(f"depth counts in, mid and out blocks and must be odd (2n+1), got {self.depth}")
        if self.img_size % self.patch:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.feature_block is not None and not 0 <= self.feature_block < self.depth:
            raise ValueError(f"feature_block must be in [0, {self.depth}), got {self.feature_block}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    @property
    def condition_dim(self) -> int:
        return self.dim if self.cond_dim is None else self.cond_dim


UVIT_PRESETS: dict[str, UViTConfig] = {
    # CPU demo and tests: sklearn's 8x8 digits.
    "uvit-tiny": UViTConfig(img_size=8, in_channels=1, patch=2, dim=64, depth=5, heads=4),
    # U-ViT-S/2 (13 blocks, 512 wide, 8 heads, 44M) on 32x32 pixels.
    "uvit-s": UViTConfig(img_size=32, in_channels=3, patch=2, dim=512, depth=13, heads=8),
    # U-ViT-M/2 (17 blocks, 768 wide, 12 heads, 131M) on 32x32x4 latents.
    "uvit-m": UViTConfig(img_size=32, in_channels=4, patch=2, dim=768, depth=17, heads=12),
    # U-ViT-L/2 (21 blocks, 1024 wide, 16 heads, 287M) on 32x32x4 latents: the paper's model.
    "uvit-l": UViTConfig(img_size=32, in_channels=4, patch=2, dim=1024, depth=21, heads=16),
}


def uvit_config(preset: str, **overrides) -> UViTConfig:
    """A named preset with field overrides; unknown presets or fields fail loudly."""
    if preset not in UVIT_PRESETS:
        raise KeyError(f"unknown U-ViT preset {preset!r}; choose one of {sorted(UVIT_PRESETS)}")
    return dataclasses.replace(UVIT_PRESETS[preset], **overrides)


class Block(nn.Module):
    """Pre-LN transformer block; with a long skip, Linear(concat[x, skip]) comes first."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unpatchify(tokens: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    """(B, N, p*p*C) patch values, row-major patches -> (B, C, sqrt(N) p, sqrt(N) p)."""
    b, n, _ = tokens.shape
    side = int(round(n ** 0.5))
    x = tokens.view(b, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * patch, side * patch)


class UViT(nn.Module):
    """v_theta(x_t, t, c). forward(x, t, y=None, layout=None, null=None, *, return_features=False).

    x: (B, in_channels, img_size, img_size); t: (B,) float flow times in [0, 1]; y: (B, cond_dim)
    condition vectors (y = 0 is the paper's zero condition for feature extraction, distinct from
    the null token); null: (B,) bool, True where the condition is replaced by the learned null
    token (CFG). y=None means every sample takes the null token. Returns v like x, and with
    return_features=True also {"cls": (B, dim), "patches": (B, N, dim)} of the feature block.
    """

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.cfg, d, n = cfg, cfg.dim, (cfg.depth - 1) // 2
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch, stride=cfg.patch)
        self.time_embed = (nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
                           if cfg.mlp_time_embed else nn.Identity())
        self.cond_embed = nn.Linear(cfg.condition_dim, d)
        self.patch_cond_embed = nn.Linear(cfg.condition_dim, d) if cfg.patch_cond else None
        self.null_token = nn.Parameter(torch.zeros(d))
        self.cls_token = nn.Parameter(torch.zeros(d))
        self.pos_embed = nn.Parameter(torch.zeros(1, _EXTRAS + cfg.num_patches, d))
        self.in_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(n))
        self.mid_block = Block(d, cfg.heads, cfg.mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.skip) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, cfg.patch ** 2 * cfg.in_channels)
        self.final_layer = (nn.Conv2d(cfg.in_channels, cfg.in_channels, 3, padding=1)
                            if cfg.conv else nn.Identity())
        self.apply(_init_weights)
        for p in (self.pos_embed, self.null_token, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)

    def _condition(self, y, null, b: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition token (B, d), null mask (B,)): the prototype embedding or the null token."""
        null = torch.zeros(b, dtype=torch.bool, device=like.device) if null is None else null.bool()
        if y is None:
            return self.null_token.to(like.dtype).expand(b, -1), torch.ones_like(null)
        if y.shape != (b, self.cfg.condition_dim):
            raise ValueError(f"y must be (B, cond_dim) = ({b}, {self.cfg.condition_dim}), "
                             f"got {tuple(y.shape)}")
        c = self.cond_embed(y.to(like.dtype))
        return torch.where(null[:, None], self.null_token.to(c.dtype), c), null

    def _patch_condition(self, y_patch, null, patches: torch.Tensor) -> torch.Tensor:
        """Per-patch condition vectors (B, N, cond_dim) embedded and added; none for null samples."""
        if self.patch_cond_embed is None:
            raise ValueError("y_patch needs a model built with UViTConfig(patch_cond=True)")
        add = self.patch_cond_embed(y_patch.to(patches.dtype))
        return patches + add * (~null).to(add.dtype)[:, None, None]

    def tokens(self, x, t, y=None, null=None, y_patch=None) -> torch.Tensor:
        """The input sequence [time, condition, CLS, patches] + positions: (B, 3 + N, d)."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        time = self.time_embed(timestep_embedding(t * self.cfg.time_scale, self.cfg.dim).to(patches.dtype))
        cond, null = self._condition(y, null, x.shape[0], patches)
        if y_patch is not None:
            patches = self._patch_condition(y_patch, null, patches)
        cls = self.cls_token.to(patches.dtype).expand(x.shape[0], -1)
        return torch.cat([torch.stack([time, cond, cls], dim=1), patches], dim=1) + self.pos_embed

    def blocks(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run in / mid / out blocks with long skips; also the feature block's output tokens."""
        want = self.cfg.depth // 2 if self.cfg.feature_block is None else self.cfg.feature_block
        skips, feats = [], None
        for i, blk in enumerate([*self.in_blocks, self.mid_block, *self.out_blocks]):
            h = blk(h, skips.pop()) if i > len(self.in_blocks) else blk(h)
            if i < len(self.in_blocks):
                skips.append(h)
            feats = h if i == want else feats
        return h, feats

    def forward(self, x, t, y=None, layout=None, null=None, *, return_features: bool = False,
                y_patch=None):
        if layout is not None:
            raise ValueError("U-ViT takes no spatial layout: use the UNet box64 / seg64 presets")
        h, feats = self.blocks(self.tokens(x, t, y, null, y_patch))
        h = self.decoder_pred(self.norm(h))[:, _EXTRAS:]
        v = self.final_layer(unpatchify(h, self.cfg.in_channels, self.cfg.patch))
        if not return_features:
            return v
        return v, {"cls": feats[:, _CLS], "patches": feats[:, _EXTRAS:]}


def _init_weights(m: nn.Module) -> None:
    """U-ViT's init: truncated-normal(0.02) linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
