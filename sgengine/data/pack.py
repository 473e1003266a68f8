"""``pack``: decode a source once, in parallel, into a memory-mappable pack (store.py's layout).

Tasks of ``chunk`` items go to a process pool (at most 2 x workers in flight, results taken in
order), so rows land at a growing cursor in the pre-allocated row file. After each task its
rows are flushed and one progress line is appended (store.Progress): a killed pack, rerun with
the same arguments, skips the recorded tasks and rewrites at most the one it was in. Unreadable
or unusable images are skipped, and listed in the manifest with their reasons.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..common.paths import check_writable
from .checks import stats_from_sums
from .sources import Source, open_source, run_task
from .store import DATA, MANIFEST, Progress, RowWriter, write_pack

CHUNK = 256  # images per task: large enough to amortise the pool's pickling, small enough to resume cheaply


def ordered_map(fn, payloads, workers: int, *args):
    """fn(payload, *args) for each payload, in order; a process pool when workers > 1."""
    if workers <= 1:
        yield from (fn(p, *args) for p in payloads)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        window = deque()
        for p in payloads:
            window.append(pool.submit(fn, p, *args))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def pack(src, out, size: int, channels: int = 3, workers: int = 2, chunk: int = CHUNK, log=print,
         progress: bool = True) -> dict:
    """Pack ``src`` into the folder ``out`` at ``size`` x ``size``; returns the manifest."""
    if size < 1 or channels not in (1, 3) or workers < 0 or chunk < 1:
        raise ValueError(f"pack needs --size >= 1, --channels 1 or 3, --workers >= 0, --chunk >= 1 "
                         f"(got {size}, {channels}, {workers}, {chunk})")
    out = check_writable(out, "OUT", "choose another OUT", folder=True)
    source = open_source(src)  # an empty or unreadable source fails here, before any work
    header = {"format": "pack", "source": str(Path(src).resolve()), "size": size, "channels": channels,
              "chunk": chunk, "items": len(source.names)}
    if (out / MANIFEST).is_file():
        return _already(out, header, log)
    out.mkdir(parents=True, exist_ok=True)
    prog = Progress(out, header)
    t0, done = time.perf_counter(), len(prog.entries)
    _decode(source, out, prog, size, channels, workers, chunk, progress)
    man = _finish(source, out, prog, header)
    log(f"packed {man['count']} images ({len(man['skipped'])} skipped, {done} task(s) resumed) "
        f"at {size}x{size} into {out} in {time.perf_counter() - t0:.1f} s")
    return man


def _already(out: Path, header: dict, log) -> dict:
    man = json.loads((out / MANIFEST).read_text())
    if man.get("source") != header["source"] or man.get("size") != header["size"]:
        raise ValueError(f"{out} already holds a pack of {man.get('source')} at {man.get('size')} px: "
                         "choose another OUT")
    log(f"{out} is already a complete pack ({man['count']} images); nothing to do")
    return man


def _decode(source: Source, out: Path, prog: Progress, size, channels, workers, chunk, progress) -> None:
    tasks = source.tasks(chunk)
    start = len(prog.entries)
    cursor = prog.entries[-1]["cursor"] if start else 0
    writer = RowWriter(out / DATA, len(source.names), (size, size, channels), np.uint8)
    payloads = (source.payload(a, b) for a, b in tasks[start:])
    results = ordered_map(decode_task, payloads, workers, size, channels)
    for i, (rows, skipped, (s, sq)) in enumerate(tqdm(results, total=len(tasks) - start, desc="pack",
                                                disable=not progress), start):
        writer.write(cursor, rows)
        cursor += len(rows)
        prog.record({"task": i, "cursor": cursor, "skipped": [[tasks[i][0] + k, why] for k, why in skipped],
                     "sum": s, "sq": sq})
    writer.finish(cursor)


def decode_task(payload, size: int, channels: int):
    """In a worker: the task's rows, skipped items, and per-channel pixel sums (for the manifest's stats)."""
    rows, skipped = run_task(payload, size, channels)
    return rows, skipped, pixel_sums(rows)


def pixel_sums(rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel sum and sum of squares of uint8 rows, exactly, from 256-bin histograms (no float copy)."""
    v = np.arange(256, dtype=np.float64)
    hists = [np.bincount(rows[..., c].reshape(-1), minlength=256) for c in range(rows.shape[-1])]
    return [float(h @ v) for h in hists], [float(h @ (v * v)) for h in hists]


def _finish(source: Source, out: Path, prog: Progress, header: dict) -> dict:
    skipped = {k: why for e in prog.entries for k, why in e["skipped"]}
    keep = [i for i in range(len(source.names)) if i not in skipped]
    count = prog.entries[-1]["cursor"] if prog.entries else 0
    if count != len(keep):
        raise RuntimeError(f"{out}: {count} rows written but {len(keep)} images kept; delete {out} and pack again")
    listed = [[source.names[k], why] for k, why in sorted(skipped.items())]
    if not keep:
        raise ValueError(f"none of the {len(source.names)} images of {header['source']} could be read; "
                         f"first: {listed[0][0]} ({listed[0][1]})")
    sums = np.sum([e["sum"] for e in prog.entries], 0), np.sum([e["sq"] for e in prog.entries], 0)
    n_px = count * header["size"] ** 2
    labels = None if source.labels is None else source.labels[keep]
    man = {"kind": "images", "source": header["source"], "source_kind": source.kind, "size": header["size"],
           "channels": header["channels"], "count": count, "dtype": "uint8",
           "bytes": count * header["size"] ** 2 * header["channels"], "classes": source.classes,
           "skipped": listed, "stats": stats_from_sums(sums[0], sums[1], n_px, np.uint8)}
    return write_pack(out, man, [source.names[k] for k in keep], labels)
