"""Classifier-free guidance as a wrapper around a conditional network.

``CFG(net, w, y=..., layout=...)`` is a ``denoise(x, t)`` callable for any sampler.
It runs ONE batched forward of 2B samples ([unconditional; conditional] stacked) and
returns pred_u + w (pred_c - pred_u) (SPEC section 1). The combination is linear, so it
serves eps (DDPM), D (EDM) and velocity (flow matching) predictions alike. w=0 is a
single unconditional pass of B (no doubling); w=1 a single conditional pass.
"""
from __future__ import annotations

import torch


def _double(v):
    return None if v is None else torch.cat([v, v], dim=0)


class CFG:
    def __init__(self, net, w: float, **cond):
        self.net, self.w, self.cond = net, float(w), cond

    def _null(self, x: torch.Tensor, value: bool) -> torch.Tensor:
        return torch.full((x.shape[0],), value, dtype=torch.bool, device=x.device)

    def pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_u, pred_c) from one batched forward of 2B."""
        cond = {k: _double(v) for k, v in self.cond.items()}
        null = torch.cat([self._null(x, True), self._null(x, False)])
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), null=null, **cond)
        return out.chunk(2)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.w == 0.0:
            return self.net(x, t, null=self._null(x, True), **self.cond)
        if self.w == 1.0:
            return self.net(x, t, null=self._null(x, False), **self.cond)
        pred_u, pred_c = self.pair(x, t)
        return pred_u + self.w * (pred_c - pred_u)
