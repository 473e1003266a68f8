"""Self-attention guidance (Hong et al., "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance", Eq. 16-17; SPEC section 4) as a ``denoise(x, t)`` callable.

One step inside the window, with pred the native prediction (eps, D or v) and mass the per-key
attention mass of ``layer`` read during that same forward (``capture_key_mass``, any network an
attention adapter claims):

    x0, eps = param.x0_eps(x_t, pred_u, t);   (a, b) = param.coeffs(t)
    x_deg   = a (M blur(x0) + (1 - M) x0) + b eps,   M = up(mass / mean(mass) > threshold)   (fused kernel)
    pred    = base + s (pred_u - pred_deg - g (x_t - x_deg)),      pred_deg = model(x_deg)

mean(mass) is the mean over the image keys: 1 for pure self-attention (the paper's "mass > 1"); where
the image queries also attend to other keys (text in joint attention, the U-ViT's time / condition /
CLS tokens) it is the share they give to image keys, so the mask still marks above-average image keys.

base = pred_u without CFG (so pred = pred' + (1+s)(pred - pred'), Eq. 17), and with CFG
base = pred_u + w (pred_c - pred_u) from ONE batched [uncond; cond] forward, mask and x0 from the
unconditional half and the extra forward of B under the null condition (SPEC 4).

g = param.input_gain(t) = d pred / d x_t at fixed eps. Eq. 17 is defined on eps, and pred_u and
pred_deg are evaluated at different inputs; eps = c (x - k pred) is affine in pred with an
input-dependent offset, so for D and v a plain native combination would add s g (x_t - x_deg) =
s M (x0 - blur(x0)): an unsharp mask, not the paper's guidance. With the g term the result
equals Eq. 17 computed on eps and mapped back, for DDPM (g = 0), EDM (g = 1) and flow (g = 1/t).
The CFG part needs no correction: both halves see the same x_t.
"""
from __future__ import annotations

import torch

from ..kernels.sag_degrade import sag_degrade
from .attach import capture_key_mass
from .cfg import CFG
from .param import Parameterization


def check_sag_args(blur, window, threshold) -> None:
    k, sigma = blur
    if int(k) != k or k < 1 or k % 2 == 0 or not sigma > 0:
        raise ValueError(f"blur must be (odd kernel_size >= 1, sigma > 0), e.g. (9, 1.0); got {blur}")
    if window is not None and not (len(window) == 2 and window[0] <= window[1]):
        raise ValueError(f"window must be (t_lo, t_hi) with t_lo <= t_hi in the network's own time "
                         f"(DDPM timestep, EDM sigma or flow t, whatever the sampler), or None for every step; got {window}")
    if threshold != threshold:
        raise ValueError("threshold must be a number (1.0: above-average attention), got nan")


def sag_degraded(param: Parameterization, x, pred, mass, t, threshold: float = 1.0, blur=(9, 1.0),
                 backend: str = "auto") -> torch.Tensor:
    """x_deg of Eq. 16: x0 blurred where the key mass is above ``threshold`` times its mean over the
    image keys, re-noised with the model's own eps with ``param``'s (a, b) at time t (B,)."""
    x0, eps = param.x0_eps(x, pred, t)
    a, b = param.coeffs(t)
    share = mass / mass.mean(dim=(1, 2), keepdim=True)  # above-average among the image keys
    return sag_degrade(x, x0, eps, share, a, b, threshold, *blur, backend=backend)


def sag_delta(param: Parameterization, x, x_deg, pred_u, pred_deg, t) -> torch.Tensor:
    """The guidance term pred_u - pred_deg - g (x_t - x_deg) in float32 (Eq. 17 on eps, mapped back)."""
    gain = param.input_gain(t).view(-1, *([1] * (x.dim() - 1)))
    return pred_u.float() - pred_deg.float() - gain * (x.float() - x_deg.float())


class SAG:
    """``SAG(net_or_cfg, param, layer, scale=0.75, threshold=1.0, blur=(9, 1.0), window=None,
    w=None, backend="auto", **cond)``: a ``denoise(x, t)`` for any sampler of ``param``'s objective.

    net_or_cfg: the objective-wrapped network, or a ``CFG`` (its w and condition are used).
    w: CFG scale for a conditional model (with ``y=...``); None: no CFG (the condition, if any,
    is kept for both forwards). window: apply SAG only for t_lo <= t <= t_hi (the network's own time,
    whatever the sampler); outside it and for
    scale = 0 the step is exactly the unguided one (no extra forward). Use as a context manager
    (or call ``close()``) to restore the network's attention hook.
    """

    def __init__(self, model, param: Parameterization, layer: str, scale: float = 0.75,
                 threshold: float = 1.0, blur=(9, 1.0), window=None, w: float | None = None,
                 backend: str = "auto", **cond):
        if isinstance(model, CFG):
            model, w, cond = model.net, model.w, {**model.cond, **cond}
        check_sag_args(blur, window, threshold)
        if w is not None and not any(v is not None for v in cond.values()):
            raise ValueError("w (the CFG scale) needs a condition: pass y=... for a conditional "
                             "model, or w=None for an unconditional one")
        self.param, self.scale, self.threshold = param, float(scale), float(threshold)
        self.blur, self.window, self.backend = (int(blur[0]), float(blur[1])), window, backend
        self.w = None if w is None else float(w)
        self.cfg = CFG(model, self.w, **cond) if self.w is not None else None
        self.null = CFG(model, 0.0, **cond) if self.w is not None else None  # the null-condition pass
        self.plain = lambda x, t: model(x, t, **cond)
        self.hook = capture_key_mass(model, layer, backend)  # the key-mass hook on ``layer``
        self.hook.active = False

    def _inside(self, t: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return (t >= self.window[0]) & (t <= self.window[1])

    def unguided(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The step without SAG: exactly what CFG / the plain network returns."""
        return self.cfg(x, t) if self.cfg is not None else self.plain(x, t)

    def _pass_with_mass(self, x, t):
        """(pred_u, base) with the key mass of the unconditional samples recorded in ``hook.mass``."""
        self.hook.active, self.hook.rows = True, slice(0, x.shape[0])
        try:
            if self.cfg is None or self.w == 0.0:
                pred_u = self.unguided(x, t)
                return pred_u, pred_u
            pred_u, pred_c = self.cfg.pair(x, t)
            return pred_u, pred_u + self.w * (pred_c - pred_u)
        finally:
            self.hook.active = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = self._inside(t)
        # Without a window no host sync is needed to decide.
        if self.scale == 0.0 or (self.window is not None and not bool(inside.any())):
            return self.unguided(x, t)
        pred_u, base = self._pass_with_mass(x, t)
        x_deg = sag_degraded(self.param, x, pred_u, self.hook.mass, t, self.threshold, self.blur, self.backend)
        pred_deg = (self.null if self.null is not None else self.plain)(x_deg, t)
        delta = sag_delta(self.param, x, x_deg, pred_u, pred_deg, t)
        s = (self.scale * inside.float()).view(-1, *([1] * (x.dim() - 1)))
        return (base.float() + s * delta).to(base.dtype)

    def close(self) -> None:
        self.hook.close()

    def __enter__(self) -> "SAG":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
