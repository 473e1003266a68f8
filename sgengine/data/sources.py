"""What ``python -m sgengine.data pack`` reads: image folders, ImageNet32/64 npz batches, tar shards.

A source is listed once, in the main process, into items (name, label) in a fixed order, and cut
into tasks of ``chunk`` consecutive items. A task's payload is small and picklable (paths, tar
offsets, or npz rows), so a process pool decodes tasks in parallel and a killed pack resumes at
the first unfinished task. ``run_task`` (in a worker) returns the decoded rows, uint8
(n, size, size, C), of the task's readable items and the reasons for the others.

- folder: every image under it, recursively; the label is the first-level folder (sorted names).
- npz: the official downsampled-ImageNet batches (``data``: flattened C x H x W rows, ``labels``:
  1-based) or an array under 'x' / 'images' (labels 'y' / 'labels', as they are); one file or a
  folder of them, in name order.
- tar: WebDataset shards, one uncompressed .tar or a folder of them: members sharing a key (the
  path up to the basename's first dot) form a sample; its image is the first image member, its
  label the integer in a ``.cls`` member.
"""
from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .decode import Unusable, decode_image, resize_rows

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
READ_ERRORS = (OSError, Unusable, ValueError, SyntaxError, EOFError)  # PIL's ways of saying "unreadable"


def np_load(path: str | os.PathLike):
    """np.load (.npy memory-mapped) of every reader of arrays, with a one-line error for truncated or
    foreign files (a cut .npz has no zip directory: zipfile's BadZipFile, not a ValueError)."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode="c" if path.suffix == ".npy" else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # numpy's and zipfile's "cut short"
        if isinstance(err, OSError) and not path.is_file():
            raise  # missing: the caller's FileNotFoundError names it
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {' '.join(str(err).split())}): a truncated "
                         "or partial copy? copy it again, or save it with np.save / np.savez") from err


@dataclass
class Source:
    kind: str  # 'folder' | 'npz' | 'tar'
    path: Path
    names: list[str]
    refs: list  # per item: a path, (tar, offset, size), or (npz file, row)
    labels: np.ndarray | None = None  # int64 (N,)
    classes: list[str] = field(default_factory=list)

    def tasks(self, chunk: int) -> list[tuple[int, int]]:
        return [(s, min(s + chunk, len(self.names))) for s in range(0, len(self.names), chunk)]

    def payload(self, start: int, stop: int):
        """What a worker needs for items [start, stop): npz rows are read here, once per file."""
        if self.kind != "npz":
            return self.kind, self.refs[start:stop]
        file, row0 = self.refs[start]
        return "rows", npz_rows(file)[row0:row0 + stop - start]


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _not_a_source(path: Path) -> str:
    what = ("an .npy array: train on it as it is (--data FILE.npy), or save it as np.savez(FILE.npz, x=array) "
            "to pack it") if path.suffix == ".npy" else ("a single image: pass the folder that holds it"
                                                         if path.suffix.lower() in IMAGE_SUFFIXES else
                                                         "a file of another kind")
    return (f"{path} is not a pack source, which is an image folder, .npz batches or .tar shards; {path.name} "
            f"is {what}")


def open_source(spec: str | os.PathLike) -> Source:
    """List a folder, an .npz (or a folder of them) or a .tar shard (or a folder of them)."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"pack source {path} does not exist: pass an image folder, .npz batches or .tar shards")
    if path.is_file() and path.suffix != ".npz" and not path.name.endswith(".tar"):
        raise ValueError(_not_a_source(path))
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        src = _folder(path)
    elif any(f.suffix == ".npz" for f in files):
        src = _npz(path, [f for f in files if f.suffix == ".npz"])
    elif any(f.name.endswith(".tar") for f in files):
        src = _tars(path, [f for f in files if f.name.endswith(".tar")])
    else:
        raise ValueError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), .npz batches or .tar "
                         "shards (compressed .tar.gz: unpack it, or gunzip to a plain .tar)")
    if not src.names:
        raise ValueError(f"pack source {path} holds no images: nothing to pack")
    return src


def folder_labels(names: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Labels from the first-level folder of each relative name (None when all sit at the top)."""
    if all(os.sep not in n for n in names):
        return None, []
    tops = [n.split(os.sep)[0] for n in names]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[t] for t in tops], dtype=np.int64), classes


def _folder(root: Path) -> Source:
    paths = list_images(root)
    names = [str(p.relative_to(root)) for p in paths]
    labels, classes = folder_labels(names)
    return Source("folder", root, names, [str(p) for p in paths], labels, classes)


# ----------------------------------------------------------------------------------------- npz

def npz_shape(file: Path, key: str) -> tuple[int, ...]:
    """The shape of one array in an .npz, from its .npy header only (no data read)."""
    with zipfile.ZipFile(file) as z, z.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(fh)[0]


def _image_key(file: Path) -> str:
    with np_load(file) as z:
        keys = list(z.files)
    key = next((k for k in ("data", "x", "images", "arr_0") if k in keys), None)
    if key is None:
        raise ValueError(f"{file} holds {keys}; expected the official 'data' rows or images under 'x' / 'images'")
    return key


@lru_cache(maxsize=1)  # one batch file in memory at a time: tasks come in file order
def npz_rows(file: str) -> np.ndarray:
    """uint8 (n, H, W, C) rows of one batch file (official flattened C x H x W rows reshaped)."""
    key = _image_key(Path(file))
    with np_load(file) as z:
        arr = z[key]
    if key == "data":
        side = int(round((arr.shape[1] / 3) ** 0.5))
        if arr.ndim != 2 or 3 * side * side != arr.shape[1]:
            raise ValueError(f"{file}: 'data' rows of length {arr.shape[1]} are not 3 x H x H images")
        arr = arr.reshape(len(arr), 3, side, side).transpose(0, 2, 3, 1)
    from .checks import as_uint8_nhwc  # the array rules of checks.py: uint16 scaled, float refused

    return as_uint8_nhwc(arr, file)


def npz_labels(file: Path) -> np.ndarray | None:
    with np_load(file) as z:
        if "data" in z.files and "labels" in z.files:  # official batches: 1-based class ids
            return np.asarray(z["labels"], dtype=np.int64).reshape(-1) - 1
        key = next((k for k in ("y", "labels") if k in z.files), None)
        return None if key is None else np.asarray(z[key], dtype=np.int64).reshape(-1)


def _npz(root: Path, files: list[Path]) -> Source:
    names, refs, labels = [], [], []
    for f in files:
        n = npz_shape(f, _image_key(f))[0]
        names += [f"{f.name}[{i}]" for i in range(n)]
        refs += [(str(f), i) for i in range(n)]
        labels.append(npz_labels(f))
    lab = None if any(x is None for x in labels) else np.concatenate(labels)
    if lab is not None and (len(lab) != len(names) or (len(lab) and lab.min() < 0)):
        raise ValueError(f"{root}: labels do not match the images (count {len(lab)} vs {len(names)}, or below 0)")
    return Source("npz", root, names, refs, lab)


# ----------------------------------------------------------------------------------------- tar

def _tars(root: Path, shards: list[Path]) -> Source:
    names, refs, labels = [], [], []
    for shard in shards:
        for key, (ref, label) in _index_shard(shard).items():
            names.append(f"{shard.name}/{key}")
            refs.append(ref)
            labels.append(label)
    lab = None if any(x is None for x in labels) else np.array(labels, dtype=np.int64)
    return Source("tar", root, names, refs, lab)


def _index_shard(shard: Path) -> dict:
    """key -> ((shard, data offset, size) of its image, its .cls label or None), in member order."""
    samples: dict = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                base, _, ext = m.name.rpartition("/")[2].partition(".")
                key = m.name.rpartition("/")[0] + "/" + base if "/" in m.name else base
                ref, label = samples.get(key, (None, None))
                if m.isfile() and "." + ext.lower().rpartition(".")[2] in IMAGE_SUFFIXES and ref is None:
                    ref = (str(shard), m.offset_data, m.size)
                elif m.isfile() and ext == "cls":
                    label = int(tar.extractfile(m).read().decode().strip())
                samples[key] = (ref, label)
    except tarfile.ReadError as err:
        raise ValueError(f"cannot read tar shard {shard} ({err}): WebDataset shards are plain .tar; "
                         "gunzip a .tar.gz first") from err
    if shard.stat().st_size % tarfile.BLOCKSIZE:  # a cut at a member boundary reads as a shorter, valid shard
        raise ValueError(f"tar shard {shard} is truncated ({shard.stat().st_size} bytes, not a whole number of "
                         f"{tarfile.BLOCKSIZE}-byte tar blocks): copy it again")
    return {k: v for k, v in samples.items() if v[0] is not None}


# -------------------------------------------------------------------------------------- worker

def run_task(payload, size: int, channels: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode one task: (rows of the readable items, (offset in the task, reason) of the others)."""
    kind, refs = payload
    if kind == "rows":
        rows = refs if refs.shape[1] == size and refs.shape[2] == size else resize_rows(refs, size)
        return _channels(rows, channels), []
    out, skipped = [], []
    for i, ref in enumerate(refs):
        try:
            out.append(decode_image(ref if kind == "folder" else _tar_bytes(ref), size, channels))
        except READ_ERRORS as err:
            skipped.append((i, f"{type(err).__name__}: {err}"))
    rows = np.stack(out) if out else np.empty((0, size, size, channels), np.uint8)
    return rows, skipped


def _tar_bytes(ref) -> bytes:
    shard, offset, n = ref
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return fh.read(n)


def _channels(rows: np.ndarray, channels: int) -> np.ndarray:
    if rows.shape[-1] == channels:
        return rows
    if channels == 1:  # ITU-R 601-2 luma, as PIL's convert('L')
        return np.round(rows[..., :3] @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
    return np.repeat(rows, 3, axis=-1) if rows.shape[-1] == 1 else rows[..., :3]
