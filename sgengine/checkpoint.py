"""Checkpoints: safetensors weights (live and EMA) plus optimizer / step / RNG state.

Each checkpoint is a folder ``ckpt/step_NNNNNNNN`` written under a temporary name and
renamed into place when complete; ``ckpt/latest`` names the newest one and is itself
replaced atomically. ``meta.json`` is written last and records every other file's size
and CRC-32, so a checkpoint is trusted only when its files match it: a file cut short or
damaged after the write (a full disk, a copy interrupted, a kill -9 in the middle of a
copy) is caught before it is loaded, and readers fall back to the newest intact step.
CRC-32 (zlib) detects truncation and bit rot at ~2 GB/s; it is no defence against tampering.

This module sits below training (architecture.md): the sampler, the annotators and the
evaluator read checkpoints without importing the trainer.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .common.io import atomic_write, naming_a_full_disk

MANIFEST = "files"  # meta.json: {path relative to the folder: [size in bytes, CRC-32]}
LEGACY_FILES = ("model.safetensors", "ema.safetensors", "state.pt")  # checkpoints written without a manifest


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted, or none at all; the message names the file and the fix."""


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
    with naming_a_full_disk(tmp):
        try:
            _write_folder(tmp, model, ema, state, meta, extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets the space back; older steps stay
            raise
    _set_aside(final)
    os.replace(tmp, final)
    atomic_write(ckdir / "latest", lambda tmp: tmp.write_text(final.name))
    _prune(ckdir, keep)
    return final


def _write_folder(tmp: Path, model, ema, state: dict, meta: dict, extra) -> None:
    tmp.mkdir()
    save_file(_state_dict(model), str(tmp / "model.safetensors"))
    save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
    with open(tmp / "state.pt", "wb") as fh:  # a file object keeps the errno of a failed write (a path loses it)
        torch.save(state, fh)
    if extra is not None:
        extra(tmp)
    record = json.dumps({**meta, MANIFEST: manifest(tmp)}, indent=1)
    atomic_write(tmp / "meta.json", lambda f: f.write_text(record))  # last: it vouches for the others


def _prune(ckdir: Path, keep: int) -> None:
    done = step_folders(ckdir)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def manifest(folder: Path) -> dict[str, list[int]]:
    """Size and CRC-32 of every file under ``folder`` (sub-folders included) but meta.json."""
    files = (p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "meta.json")
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, _crc32(p)] for p in files}


def damage(ckpt: str | os.PathLike) -> str | None:
    """Why ``ckpt`` cannot be trusted, naming the file; None when every file matches meta.json."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the write never finished)"
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"meta.json cannot be read ({type(err).__name__}: cut short or damaged)"
    if not isinstance(meta, dict) or "config" not in meta:
        return "meta.json holds no checkpoint record (cut short or damaged)"
    files = meta.get(MANIFEST) or {name: None for name in LEGACY_FILES}
    return next(filter(None, (_file_damage(ckpt / name, rec) for name, rec in files.items())), None)


def _file_damage(path: Path, record) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if record is None:  # legacy checkpoint: presence is all that can be checked
        return None
    size, crc = record
    if path.stat().st_size != size:
        return f"{path.name} has {path.stat().st_size} bytes but meta.json recorded {size} (cut short)"
    if _crc32(path) != crc:
        return f"{path.name} does not match the checksum in meta.json (damaged)"
    return None


def _ckpt_dir(root: Path) -> Path:
    """A run folder's ckpt/, or ``root`` itself when it is a ckpt/ folder."""
    return root if (root / "latest").exists() or any(root.glob("step_*")) else root / "ckpt"


def step_folders(root: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder under ``root`` (a run folder or its ckpt/), intact or not, oldest first."""
    return sorted(p for p in _ckpt_dir(Path(root)).glob("step_*") if p.is_dir())


def newest_valid(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint (or None) and the newer ones skipped, each with its damage."""
    skipped = []
    for folder in reversed(step_folders(root)):
        reason = damage(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def latest_checkpoint(root: str | os.PathLike, log=None) -> Path | None:
    """The newest intact checkpoint folder under ``root`` (a run dir or its ckpt/), or None; each
    damaged newer one is reported through ``log`` (never deleted)."""
    found, skipped = newest_valid(root)
    for folder, reason in skipped if log else ():
        log(f"skipping checkpoint {folder}: {reason}")
    return found


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged_<name>`` beside it (kept for inspection, out of the
    way of the step that will be written again); returns the new path."""
    target, n = folder.with_name(f"damaged_{folder.name}"), 1
    while target.exists():
        target, n = folder.with_name(f"damaged_{folder.name}.{n}"), n + 1
    os.replace(folder, target)
    return target


def _set_aside(final: Path) -> None:
    """A step written again replaces an intact folder of that step, but never a damaged one."""
    if final.is_dir() and damage(final) is not None:
        set_aside(final)
    shutil.rmtree(final, ignore_errors=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_checkpoint(path: str | os.PathLike, log=_stderr) -> Path:
    """Accept a checkpoint folder, a run folder, or a run's ckpt/ folder; the result is intact (each
    damaged newer step of a run is reported through ``log``, stderr by default)."""
    path = Path(path)
    if (path / "meta.json").exists() or path.name.startswith("step_"):
        reason = damage(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {reason}; pass the run folder to use "
                                  "its newest intact step, or another step folder")
        return path
    found, skipped = newest_valid(path)
    if found is None:
        raise no_checkpoint(path, skipped)
    for folder, reason in skipped if log else ():
        log(f"skipping checkpoint {folder}: {reason}")
    return found


def no_checkpoint(root: Path, skipped: list[tuple[Path, str]]) -> Exception:
    if not skipped:
        return FileNotFoundError(f"no checkpoint under {root}: pass a run folder (--out of sgengine.train) "
                                 "or one of its ckpt/step_* folders")
    listed = "; ".join(f"{folder.name}: {reason}" for folder, reason in skipped)
    return CheckpointError(f"no intact checkpoint under {root} ({listed}); restore the files or start a new --out")


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / f"{which}.safetensors"))


def load_into(module: torch.nn.Module, ckpt: Path, which: str = "ema") -> torch.nn.Module:
    """Load ``which`` weights of ``ckpt`` into ``module``, the network its meta.json describes; weights of
    another network are a one-line CheckpointError naming the first tensor that does not fit."""
    tensors, want = load_weights(ckpt, which), module.state_dict()
    misfit = _misfit(tensors, want)
    if misfit:
        raise CheckpointError(f"{Path(ckpt) / which}.safetensors does not fit the network its meta.json describes "
                              f"({misfit}): the folder mixes files of different runs; pass a checkpoint folder "
                              "that sgengine.train wrote whole")
    module.load_state_dict(tensors)
    return module


def _misfit(tensors: dict, want: dict) -> str | None:
    for name, t in want.items():
        if name not in tensors:
            return f"{name} is missing from the file"
        if tuple(tensors[name].shape) != tuple(t.shape):
            return f"{name} is {tuple(tensors[name].shape)} in the file but {tuple(t.shape)} in the network"
    extra = sorted(set(tensors) - set(want))
    return f"{extra[0]} is not in the network" if extra else None


def load_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)
