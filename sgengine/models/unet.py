"""The self-guided-diffusion UNet (ADM style), appendix B.1 and Tables 8-10.

Guidance injection (SPEC section 1, appendix Fig. 12):
- image-level condition y (one-hot or multi-hot, size K) -> MLP Linear(K, d/2) SiLU Linear(d/2, d/2),
  concatenated with the timestep embedding (d/2) and fed to every res-block;
- optional spatial layout (box mask or one-hot segmentation, C_layout channels) concatenated to x_t;
- optional cross-attention on condition tokens at low-resolution levels, CA(m, concat[k, m]).
A per-sample ``null`` mask swaps the condition for the learned null embedding and zeroes the layout
at the same time, which is how classifier-free guidance is trained and sampled.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..common.flags import ConfigError, Count, Fraction, NonNegInt, validate
from .attention import MultiHeadAttention


@dataclass(frozen=True)
class UNetConfig:
    img_size: Count = 32
    in_channels: Count = 3
    channels: Count = 128
    channel_mult: tuple[Count, ...] = (1, 2, 4)
    num_res_blocks: Count = 2
    attention_ds: tuple[Count, ...] = (4,)  # downsample factors with self-attention ("resolution 4")
    heads: Count = 8
    dropout: Fraction = 0.0
    scale_shift_norm: bool = True
    num_classes: NonNegInt = 0  # K, size of the image-level condition vector; 0 = unconditional
    cond_embed_dim: Count = 256  # Tables 8-10: conditioning embedding dimension
    layout_channels: NonNegInt = 0  # C_layout: 1 for a box mask, K for a one-hot segmentation
    context_tokens: NonNegInt = 0  # Table 10: 8 condition tokens ...
    context_dim: Count = 32  # ... of dim 32
    cross_attention_ds: tuple[Count, ...] = ()  # levels with cross-attention on the tokens

    def __post_init__(self):
        validate(self)
        if not self.channel_mult:
            raise ValueError("channel_mult needs at least one level, e.g. 1,2,4")
        if self.img_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"img_size {self.img_size} must be divisible by 2^(levels-1) "
                             f"for channel_mult={self.channel_mult}")
        if self.context_tokens and not self.num_classes:
            raise ValueError("cross-attention tokens come from the condition vector: set num_classes > 0")
        self._check_heads()

    def _check_heads(self) -> None:
        """Every attention block (the middle one always) splits its width into ``heads`` equal parts."""
        widths = {self.channels * m for level, m in enumerate(self.channel_mult)
                  if 2 ** level in self.attention_ds + self.cross_attention_ds}
        for width in sorted(widths | {self.channels * self.channel_mult[-1]}):
            if width % self.heads:
                fits = [h for h in range(1, width + 1) if not any(w % h for w in widths | {width})]
                fits = sorted(sorted(fits, key=lambda h: abs(h - self.heads))[:3])
                raise ConfigError("heads", f"must divide every attention width (here {width} = channels x "
                                  f"channel_mult), got {self.heads}: pass one of {', '.join(map(str, fits))}")


UNET_PRESETS: dict[str, UNetConfig] = {
    # Table 8: 3x32x32, ImageNet32.
    "in32": UNetConfig(img_size=32),
    # Table 9: 3x64x64, ImageNet64.
    "in64": UNetConfig(img_size=64),
    # Table 10: 3x64x64 box / mask guidance with 8 context tokens of dim 32 (VOC, COCO).
    # Self-boxed: 1-channel box mask + one-hot of K=100 clusters (SPEC: K=100 VOC/COCO).
    "box64": UNetConfig(img_size=64, num_classes=100, layout_channels=1, context_tokens=8,
                        cross_attention_ds=(4,)),
    # Self-segmented: K=21 one-hot mask channels (VOC) + multi-hot of the segments present.
    "seg64": UNetConfig(img_size=64, num_classes=21, layout_channels=21, context_tokens=8,
                        cross_attention_ds=(4,)),
    # Small models for CPU: the embedded digits job and the tests.
    "digits": UNetConfig(img_size=16, in_channels=1, channels=32, channel_mult=(1, 2),
                         num_res_blocks=1, attention_ds=(2,), heads=4, cond_embed_dim=64),
    "tiny": UNetConfig(img_size=8, in_channels=1, channels=16, channel_mult=(1, 2),
                       num_res_blocks=1, attention_ds=(2,), heads=2, cond_embed_dim=32),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps -> (B, dim) (Transformer / ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block; with scale_shift_norm the embedding modulates the second norm."""

    def __init__(self, ch: int, out: int, emb_dim: int, dropout: float, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out * (2 if scale_shift else 1)))
        self.out_norm = _norm(out)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out, out, 3, padding=1)))
        self.skip = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the feature map; with ``context_dim`` it attends to concat[tokens, m]."""

    def __init__(self, ch: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.norm = _norm(ch)
        self.attn = MultiHeadAttention(ch, heads)
        self.context = nn.Linear(context_dim, ch) if context_dim else None
        _zero(self.attn.proj)

    def forward(self, x: torch.Tensor, emb=None, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        m = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): image tokens
        ctx = None
        if self.context is not None and context is not None:
            ctx = torch.cat([self.context(context), m], dim=1)  # CA(m, concat[k, m])
        return x + self.attn(m, ctx).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.ModuleList):
    """A sequence of blocks that all take (x, emb, context)."""

    def forward(self, x, emb, context):
        for block in self:
            x = block(x, emb, context)
        return x


class ConditionEmbedding(nn.Module):
    """y (B, K) -> (B, d/2) through the paper's MLP, tokens for cross-attention, null swaps."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        d, k = cfg.cond_embed_dim, cfg.num_classes
        self.mlp = nn.Sequential(nn.Linear(k, d), nn.SiLU(), nn.Linear(d, d))
        self.null = nn.Parameter(torch.zeros(d))
        self.shape = (cfg.context_tokens, cfg.context_dim)
        n_tok = cfg.context_tokens * cfg.context_dim
        self.tokens = nn.Linear(k, n_tok) if n_tok else None
        self.null_tokens = nn.Parameter(torch.zeros(n_tok)) if n_tok else None

    def forward(self, y: torch.Tensor, null: torch.Tensor):
        keep = ~null[:, None]
        emb = torch.where(keep, self.mlp(y), self.null.to(y.dtype))
        if self.tokens is None:
            return emb, None
        tok = torch.where(keep, self.tokens(y), self.null_tokens.to(y.dtype))
        return emb, tok.view(-1, *self.shape)


class UNet(nn.Module):
    """eps_theta(x_t, t, y, layout). forward(x, t, y=None, layout=None, null=None) -> (B, C, H, W).

    x: (B, in_channels, H, W); t: (B,) float timesteps; y: (B, K) float; layout:
    (B, C_layout, H, W); null: (B,) bool, True where the condition is dropped (CFG).
    y=None on a conditional model means every sample takes the null condition.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        # d = [time d/2 ; condition d/2] when conditional (SPEC section 1), ADM's 4ch otherwise.
        d_t = cfg.cond_embed_dim if cfg.num_classes else 4 * ch
        d = d_t + (cfg.cond_embed_dim if cfg.num_classes else 0)
        self.time_mlp = nn.Sequential(nn.Linear(ch, d_t), nn.SiLU(), nn.Linear(d_t, d_t))
        self.cond = ConditionEmbedding(cfg) if cfg.num_classes else None
        self.input = nn.Conv2d(cfg.in_channels + cfg.layout_channels, ch, 3, padding=1)
        self.down, self.mid, self.up, skips = self._build(cfg, d)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1)))

    def _attn(self, cfg: UNetConfig, ch: int, ds: int) -> list[nn.Module]:
        cross = cfg.context_dim if ds in cfg.cross_attention_ds and cfg.context_tokens else None
        return [AttentionBlock(ch, cfg.heads, cross)] if ds in cfg.attention_ds or cross else []

    def _res(self, cfg: UNetConfig, ch: int, out: int, d: int) -> ResBlock:
        return ResBlock(ch, out, d, cfg.dropout, cfg.scale_shift_norm)

    def _build(self, cfg: UNetConfig, d: int):
        ch, ds, skips = cfg.channels, 1, [cfg.channels]
        down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                down.append(Level([self._res(cfg, ch, mult * cfg.channels, d), *self._attn(cfg, mult * cfg.channels, ds)]))
                ch = mult * cfg.channels
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                down.append(Level([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        mid = Level([self._res(cfg, ch, ch, d), AttentionBlock(ch, cfg.heads, self._ctx(cfg, ds)), self._res(cfg, ch, ch, d)])
        up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [self._res(cfg, ch + skips.pop(), mult * cfg.channels, d)]
                ch = mult * cfg.channels
                blocks += self._attn(cfg, ch, ds)
                if level and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                    ds //= 2
                up.append(Level(blocks))
        return down, mid, up, skips

    @staticmethod
    def _ctx(cfg: UNetConfig, ds: int) -> int | None:
        return cfg.context_dim if cfg.context_tokens and ds in cfg.cross_attention_ds else None

    def embed(self, x, t, y, layout, null):
        """Timestep + condition embedding, layout-concatenated input and context tokens."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels).to(x.dtype))
        if self.cond is None:
            return emb, x, None
        b = x.shape[0]
        null = torch.zeros(b, dtype=torch.bool, device=x.device) if null is None else null.bool()
        if y is None:
            y, null = x.new_zeros(b, self.cfg.num_classes), torch.ones_like(null)
        c, tokens = self.cond(y.to(x.dtype), null)
        if self.cfg.layout_channels:
            layout = x.new_zeros(b, self.cfg.layout_channels, *x.shape[2:]) if layout is None else layout.to(x.dtype)
            x = torch.cat([x, layout * (~null).to(x.dtype)[:, None, None, None]], dim=1)
        return torch.cat([emb, c], dim=1), x, tokens

    def forward(self, x, t, y=None, layout=None, null=None):
        emb, h, tokens = self.embed(x, t, y, layout, null)
        h = self.input(h)
        hs = [h]
        for level in self.down:
            h = level(h, emb, tokens)
            hs.append(h)
        h = self.mid(h, emb, tokens)
        for level in self.up:
            h = level(torch.cat([h, hs.pop()], dim=1), emb, tokens)
        return self.out(h)


def unet_config(preset: str, **overrides) -> UNetConfig:
    """A named preset with field overrides; unknown presets or fields fail loudly."""
    if preset not in UNET_PRESETS:
        raise KeyError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    return dataclasses.replace(UNET_PRESETS[preset], **overrides)
