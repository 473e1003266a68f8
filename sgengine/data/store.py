"""The on-disk pack: one raw row file, labels, names, and an atomically written manifest.

Layout of a pack folder (``python -m sgengine.data pack`` and ``encode`` write it)::

    data.bin        rows (N, H, W, C), NHWC, dtype per manifest (uint8 images, float16 latents; a
                    latent pack of the posterior stores 2C: C mean channels, then C std channels)
    labels.npy      int64 (N,)          (only when the source has labels)
    names.txt       one source name per row
    manifest.json   format, kind, source, size, channels (what the model sees), count, dtype, bytes
                    (stored), skipped, stats; latent packs also posterior ('mean' or 'mean_std')
    progress.jsonl  only while unfinished: the arguments, then one line per finished task

Why NHWC: decoders (PIL) and the official ImageNet npz rows reshape to it, so workers write what
they decode with no transpose; one row is one contiguous block either way, so a batch gather
reads the same pages; and the NCHW view the network wants is a free ``permute`` on the host
(the copy to the device keeps it, channels_last training consumes it directly).
Why a headerless raw file: its length is checked against the manifest (a truncated copy is
caught before training), and it is pre-allocated and filled in place, so a killed pack resumes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..common.io import atomic_write

FORMAT = "sgengine-pack/1"
DATA, MANIFEST, NAMES, LABELS, PROGRESS = "data.bin", "manifest.json", "names.txt", "labels.npy", "progress.jsonl"
# What a latent row holds of q(z|x), and its stored channels per latent channel: the mean, or the
# mean then the std (so training draws z = mean + std * eps every batch).
POSTERIORS = {"mean": 1, "mean_std": 2}


class Progress:
    """progress.jsonl: a header (the pack's arguments), then one JSON line per finished task.

    A line is appended only after its rows are written to the mapping, so after a killed process
    every recorded task is in the file (the kernel owns dirty pages of a shared mapping); a torn
    last line is ignored and its task redone. Data is synced to disk once, before the manifest."""

    def __init__(self, out: Path, header: dict):
        self.path = out / PROGRESS
        lines = self._read()
        if lines and lines[0] != header:
            raise ValueError(f"{out} holds an unfinished pack of other arguments ({_diff(lines[0], header)}): "
                             "rerun with the same arguments to resume it, or choose another OUT")
        if not lines:
            self.path.write_text(json.dumps(header) + "\n")
        self.entries = lines[1:]

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn by a kill mid-append
        return out

    def record(self, entry: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.entries.append(entry)


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class RowWriter:
    """Rows written in place into a pre-allocated (sparse) raw file; ``finish`` cuts it to length."""

    def __init__(self, path: Path, capacity: int, row_shape: tuple[int, ...], dtype):
        self.path, self.row_bytes = path, int(np.prod(row_shape)) * np.dtype(dtype).itemsize
        with open(path, "ab") as fh:
            if fh.tell() < capacity * self.row_bytes:
                fh.truncate(capacity * self.row_bytes)
        self.map = np.memmap(path, dtype=dtype, mode="r+", shape=(capacity, *row_shape))

    def write(self, cursor: int, rows: np.ndarray) -> None:
        self.map[cursor:cursor + len(rows)] = rows

    def finish(self, count: int) -> int:
        """Sync to disk (a complete manifest must mean complete data), then cut to ``count`` rows."""
        self.map.flush()
        del self.map
        os.truncate(self.path, count * self.row_bytes)
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())
        return count * self.row_bytes


def write_pack(out: Path, manifest: dict, names: list[str], labels: np.ndarray | None) -> dict:
    """Names, labels, then the manifest (atomically, last: it marks the pack complete)."""
    atomic_write(out / NAMES, lambda tmp: tmp.write_text("\n".join(names) + "\n"))
    if labels is not None:
        atomic_write(out / LABELS, lambda tmp: _save_npy(tmp, np.asarray(labels, np.int64)))
    manifest = {"format": FORMAT, **manifest, "layout": "NHWC", "file": DATA, "labels": labels is not None}
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would append .npy to the temporary name
        np.save(fh, arr)


def is_pack(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / PROGRESS).is_file())


def read_manifest(path) -> dict:
    """The manifest of a complete pack, checked against its row file (one-line errors)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} is an unfinished pack (no {MANIFEST}): rerun the same "
                         "`python -m sgengine.data pack|encode` command to resume it")
    try:
        man = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / MANIFEST} is not valid JSON ({err}): re-run the pack into a new folder") from err
    if man.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST} is not an sgengine pack ({man.get('format')!r}, expected {FORMAT!r})")
    got, want = (path / DATA).stat().st_size if (path / DATA).exists() else 0, man["bytes"]
    if got != want:
        raise ValueError(f"{path / DATA} has {got} bytes but the manifest says {want} (truncated or partial copy): "
                         "copy the pack again, or re-run `python -m sgengine.data pack` into a new folder")
    return man


def posterior_kind(man: dict) -> str:
    """What the rows hold of q(z|x): 'mean_std' or 'mean'; image packs and latent packs written
    before the field read as 'mean' (one stored channel per channel)."""
    kind = man.get("posterior", "mean")
    if kind not in POSTERIORS:
        raise ValueError(f"manifest posterior {kind!r} is none of {sorted(POSTERIORS)}: encode the pack again "
                         "with this version (python -m sgengine.data encode)")
    return kind


def stored_channels(man: dict) -> int:
    return man["channels"] * POSTERIORS[posterior_kind(man)]


def open_rows(path, man: dict) -> np.ndarray:
    """The memory-mapped (N, H, W, C stored) rows. Copy-on-write mapping: pages stay shared with the
    page cache (two ranks on one node hold one copy) and torch accepts the array without a copy."""
    shape = (man["count"], man["size"], man["size"], stored_channels(man))
    return np.memmap(Path(path) / DATA, dtype=man["dtype"], mode="c", shape=shape)


def read_names(path) -> list[str]:
    return (Path(path) / NAMES).read_text().splitlines()


def read_labels(path, man: dict) -> np.ndarray | None:
    return np.load(Path(path) / LABELS) if man.get("labels") else None
