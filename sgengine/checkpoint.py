"""Checkpoints: safetensors weights (live and EMA) plus optimizer / step / RNG state.

Each checkpoint is a folder ``ckpt/step_NNNNNNNN`` written under a temporary name and
renamed into place when complete; ``ckpt/latest`` names the newest complete one and
is itself replaced atomically. A run killed at any moment leaves the previous
checkpoint intact, and ``--resume`` continues from it.

This module sits below training (architecture.md): the sampler, the annotators and the
evaluator read checkpoints without importing the trainer.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .common.io import atomic_write


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(root: str | os.PathLike, step: int, model, ema, state: dict, meta: dict,
                    keep: int = 2, extra=None) -> Path:
    """Write ``root/ckpt/step_<step>``; returns its path. ``state`` goes to state.pt.

    ``extra(folder)`` writes further files (DeepSpeed shards, online prototypes) into the
    temporary folder, so they become visible in the same atomic rename as the weights.
    """
    ckdir = Path(root) / "ckpt"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:08d}"
    tmp = ckdir / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_dict(model), str(tmp / "model.safetensors"))
    save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    if extra is not None:
        extra(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(ckdir / "latest", lambda tmp: tmp.write_text(final.name))
    _prune(ckdir, keep)
    return final


def _prune(ckdir: Path, keep: int) -> None:
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (a run dir or its ckpt/), or None."""
    root = Path(root)
    ckdir = root if (root / "latest").exists() else root / "ckpt"
    pointer = ckdir / "latest"
    if pointer.exists() and (ckdir / pointer.read_text().strip() / "meta.json").exists():
        return ckdir / pointer.read_text().strip()
    done = sorted(p for p in ckdir.glob("step_*") if (p / "meta.json").exists())
    return done[-1] if done else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder, a run folder, or a run's ckpt/ folder."""
    path = Path(path)
    if (path / "meta.json").exists() and (path / "ema.safetensors").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {path}: pass a run folder (--out of sgengine.train) "
                                "or one of its ckpt/step_* folders")
    return found


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / f"{which}.safetensors"))


def load_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)
