"""Exponential moving average of weights with the warm-up rule of SPEC section 1."""
from __future__ import annotations

import torch
from torch import nn


def ema_decay(n: int, max_decay: float = 0.9999) -> float:
    """decay = min(max_decay, (1 + n) / (10 + n)) after n updates."""
    return min(max_decay, (1.0 + n) / (10.0 + n))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if len(e_params) != len(m_params):
        raise ValueError("EMA and live model have different parameter lists")
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


class EMA:
    """An exponential moving average of a model for any training loop (SPEC section 1's warm-up rule).

    ``ema = EMA(model)`` keeps a frozen copy (``ema.module``, eval mode); call ``ema.update(model)``
    after each optimiser step; sample from ``ema.module``. ``max_decay`` must lie in [0, 1).
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"max_decay must be in [0, 1), got {max_decay}")
        import copy
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay, self.updates = float(max_decay), 0

    @property
    def decay(self) -> float:
        """The decay the next update uses."""
        return ema_decay(self.updates, self.max_decay)

    def update(self, model: nn.Module) -> None:
        ema_update(self.module, model, self.decay)
        self.updates += 1
