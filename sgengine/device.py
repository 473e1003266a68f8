"""The one rule for a device left unspecified (CUDA when available), and the one check of a device
named on a command line (before any work: a typo or a missing GPU is not found after k-means)."""
from __future__ import annotations

import argparse

import torch

HINT = "use 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'"


def device_problem(device) -> str | None:
    """Why ``device`` cannot run here (``'gpu' is not a device: ...``), or None when it can."""
    if device is None or device == "auto":
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"{device!r} is not a device: {HINT}"
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return f"{device!r} needs a CUDA GPU, and torch sees none on this machine: use 'cpu' or 'auto'"
        if d.index is not None and d.index >= n:
            return f"{device!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}"
    elif d.type not in ("cpu", "meta") and not _available(d.type):
        return f"{device!r}: torch has no {d.type} device here: {HINT}"
    return None


def _available(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def resolve_device(device=None, fallback="cpu") -> torch.device:
    """``device`` as a torch.device; None or 'auto': CUDA when available, else ``fallback``
    (e.g. the device the input already lives on). A device that cannot run here is a ValueError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else fallback)
    if isinstance(device, torch.device):
        return device
    problem = device_problem(device)
    if problem:
        raise ValueError(f"device {problem}")
    return torch.device(device)


def device_flag(text: str) -> torch.device:
    """An argparse ``type=`` for ``--device`` (the resolved device): ``error: --device 'gpu' is not a
    device: ...`` and exit 2 from FlagParser, before any work."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return resolve_device(text)
