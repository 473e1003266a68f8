"""Data path figures, side by side in one run, on Tiny ImageNet JPEGs (CPU).

    tar xzf ../shared/data/tiny-imagenet-dev-64-a.tar.gz -C /tmp
    python benchmarks/bench_data.py --n 5000 [--size 64] [--root /tmp/tiny-imagenet-dev-64-a/train]

Rows:
- decode: the serial loader before packs (PIL, no draft mode, crop-then-resize; as the old
  ``data.load_folder``), ``load_folder`` now (serial, draft mode + ADM crop), and ``pack`` on 1 and 2
  worker processes (img/s, wall clock);
- time to the first training step (tiny UNet at the pack's size, labels): ``--data`` the folder
  (decoded at start-up, as every start, resume and rank did) against ``--data`` the pack;
- two ranks on one set (two processes that read every row in batches): the RSS each adds, its
  private (anonymous) part, and the pack's resident mapped pages, from /proc/self/smaps; mapped
  pages are the page cache, held once however many ranks map them.
Skips cleanly (exit 0, one line) when the data is absent. ``pytest benchmarks`` runs a smoke size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_ROOT = Path("/tmp/tiny-imagenet-dev-64-a/train")


def serial_before(root: Path, size: int) -> int:
    """Baseline: the loader before packs (one image at a time, full decode, crop then resize)."""
    from sgengine.data import list_images

    rows = []
    for p in list_images(root):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
            rows.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
    return len(np.stack(rows))


def subset(root: Path, n: int, tmp: Path) -> Path:
    """The first n images (sorted) as symlinks, class folders kept (labels)."""
    from sgengine.data import list_images

    for p in list_images(root)[:n]:
        link = tmp / "subset" / p.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p)
    return tmp / "subset"


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers)."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes): on a shared machine the CPU figure is the stable one."""
    t0, c0 = time.perf_counter(), _cpu()
    fn(*args, **kw)
    return time.perf_counter() - t0, _cpu() - c0


def decode_rows(src: Path, n: int, size: int, tmp: Path) -> list[tuple[str, float]]:
    from sgengine.data import load_folder
    from sgengine.data.pack import pack

    rows = [("serial loader before packs", timed(serial_before, src, size)),
            ("load_folder now (serial, draft mode)", timed(load_folder, src, size, 3, False))]
    for w in (1, 2):
        rows.append((f"pack, {w} worker(s)", timed(pack, src, tmp / f"pack{w}", size, 3, w, log=lambda *a: None,
                                                  progress=False)))
    return [(name, n / wall, wall, 1000 * cpu / n) for name, (wall, cpu) in rows]


def first_step(data: str, size: int, out: Path) -> float:
    """Seconds from constructing the Trainer to the end of its first optimizer step."""
    from sgengine.config import preset
    from sgengine.training.trainer import Trainer

    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, data=data, out=str(out), condition="labels", steps=1, batch_size=16,
                              model=dataclasses.replace(tiny.model, img_size=size, in_channels=3))
    t0 = time.perf_counter()
    Trainer(cfg, log=lambda *a: None).train_step()
    return time.perf_counter() - t0


def _smaps(path: str = "/proc/self/smaps_rollup") -> dict:
    fields = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def _mapped_rss(name: str) -> float:
    """Resident MiB of this process's mappings of files called ``name`` (page cache, shareable)."""
    total, inside = 0.0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and ":" not in line.split(" ")[0]:
            inside = line.endswith("/" + name)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) / 1024
    return total


def rank_memory(data: str, size: int) -> dict:
    """One 'rank': open the set as the trainer does and read every row in batches of 64.
    Reports the growth of RSS and of anonymous (private) memory, and the pack's resident mapped pages."""
    from sgengine.data import BatchLoader, load_data

    before = _smaps()
    d = load_data(data, size, 3, progress=False)
    loader = BatchLoader(d, torch.device("cpu"))
    for a in range(0, len(d), 64):
        loader.get(torch.arange(a, min(a + 64, len(d))))
    after = _smaps()
    return {"rss": after["Rss"] - before["Rss"], "anon": after["Anonymous"] - before["Anonymous"],
            "mapped": _mapped_rss("data.bin")}


def two_ranks(data: str, size: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--rank_worker", data, "--size", str(size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def run(root: Path, n: int, size: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = subset(root, n, tmp)
        decode = decode_rows(src, n, size, tmp)
        first = [("--data folder (decoded at start-up)", first_step(str(src), size, tmp / "r1")),
                 ("--data pack (memory-mapped)", first_step(str(tmp / "pack2"), size, tmp / "r2"))]
        mem = [("folder", two_ranks(str(src), size)), ("pack", two_ranks(str(tmp / "pack2"), size))]
    set_mib = n * size * size * 3 / 2 ** 20
    return table(decode, first, mem, n, size, set_mib)


def table(decode, first, mem, n, size, set_mib) -> str:
    lines = [f"Tiny ImageNet JPEGs, {n} images at {size}x{size} ({set_mib:.0f} MiB as uint8), "
             f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| decode | img/s | wall s | CPU ms / image (all processes) |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {rate:.0f} | {t:.1f} | {cpu:.2f} |" for name, rate, t, cpu in decode]
    lines += ["", "| time to the first training step | s |", "| --- | --- |"]
    lines += [f"| {name} | {t:.1f} |" for name, t in first]
    lines += ["", "| two ranks on one set, per rank: MiB added by loading and reading every row | RSS | "
              "private (anonymous) | of it, pack pages mapped (page cache: one copy for both ranks) |",
              "| --- | --- | --- | --- |"]
    for name, ranks in mem:
        for r, m in enumerate(ranks):
            lines.append(f"| {name}, rank {r} | {m['rss']:.0f} | {m['anon']:.0f} | {m['mapped']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rank_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_worker:
        print(json.dumps(rank_memory(args.rank_worker, args.size)))
        return 0
    if not args.root.is_dir():
        print(f"skipped: {args.root} is absent (tar xzf ../shared/data/tiny-imagenet-dev-64-a.tar.gz -C /tmp)")
        return 0
    torch.set_num_threads(1)
    print(run(args.root, args.n, args.size))
    return 0


def test_data_figures_smoke():
    """A smoke size of the whole run (skipped without the data)."""
    import pytest

    if not DEFAULT_ROOT.is_dir():
        pytest.skip(f"{DEFAULT_ROOT} is absent")
    assert "| pack, 2 worker(s) |" in run(DEFAULT_ROOT, 64, 32)


if __name__ == "__main__":
    sys.exit(main())
