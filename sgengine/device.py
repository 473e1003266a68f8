"""The one rule for a device left unspecified: CUDA when available."""
from __future__ import annotations

import torch


def resolve_device(device=None, fallback="cpu") -> torch.device:
    """``device`` as a torch.device; None or 'auto': CUDA when available, else ``fallback``
    (e.g. the device the input already lives on)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else fallback)
    return torch.device(device)
