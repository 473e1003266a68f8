"""Compile audit of every Triton kernel, for GPUs this machine does not have.

    python -m sgengine.kernels.audit [--targets 80,86,89,90] [--kernels kmeans] [--json FILE]
                                     [--markdown] [--rows] [--workers 2] [--render JSON]

Each public entry point runs on stand-in inputs (fake CUDA tensors: no GPU, no driver) at the
benchmark sizes of ../shared/SPEC.md section 5, SAG at sampling batches <= 4, and odd sizes
whose pointers and strides are not 16-aligned; every dtype it accepts. The launches it makes
are captured (``_capture``): every fixed launch and every config of every autotune list. Each
distinct specialisation is compiled for every target in a process pool (``_cubin``) with a
fresh triton cache, and the cubin gives registers, spills, local loads/stores in the SASS,
shared memory against the target's limit and the matrix-instruction family.

One JSON row per (kernel, target, dtype, config), the worst over the shapes that compile it:
kernel, target, dtype, config, registers, spill_bytes, local_ldst, shared_bytes, shared_limit,
mma, selectable (False: an autotune config over the shared-memory limit, which the autotuner
skips on that GPU), plus op, module, shapes, stack_bytes, dots (tt.dot count), tuned, error.
``occupancy``: programs per launch at the benchmark sizes against SM counts.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
import tempfile
from typing import Any, Callable
from unittest import mock

import torch

from . import attention_with_key_mass, kmeans_assign, sag_degrade, sinkhorn
from ..common.gpus import GPUS
from ._capture import capture, fake_cuda
from ._cubin import MMA_FAMILIES, SHARED_LIMIT, compile_and_read, compile_key, config_text, specialise

TARGETS = (80, 86, 89, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Streaming multiprocessors of each target GPU (the H200 has the H100's 132).
SMS = {key: GPUS[key].sms for key in ("A5000", "A100", "H100")}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a public entry point on stand-in inputs; ``batch`` set = a benchmark size."""
    op: str
    shape: str
    call: Callable[[torch.dtype], Any]
    batch: int | None = None


def _attention(B, H, N, D):
    return lambda dt: attention_with_key_mass(*(fake_cuda((B, H, N, D), dt) for _ in "qkv"),
                                              backend="triton")


def _sag(B, C, side, grid, kernel_size, sigma):
    def call(dt):
        x = [fake_cuda((B, C, side, side), dt) for _ in range(3)]
        mass = fake_cuda((B, grid, grid), torch.float32)
        return sag_degrade(*x, mass, 0.9, 0.4, 1.0, kernel_size, sigma, backend="triton")
    return call


def _sinkhorn(B, K):
    return lambda dt: sinkhorn(fake_cuda((B, K), dt), backend="triton")


def _kmeans(N, d, K):
    return lambda dt: kmeans_assign(fake_cuda((N, d), dt), fake_cuda((K, d), dt), backend="triton")


CASES = (
    # SPEC section 5 sizes, SAG at batches <= 4 (head dims 64, 128 and Stable Diffusion's 160, all
    # three BLOCK_D tables), then unaligned stand-ins (odd d, N, strides).
    Case("attention_with_key_mass", "B=16 H=8 N=1024 D=64", _attention(16, 8, 1024, 64), 16),
    Case("attention_with_key_mass", "B=16 H=8 N=4096 D=64", _attention(16, 8, 4096, 64), 16),
    Case("attention_with_key_mass", "B=4 H=8 N=16384 D=64", _attention(4, 8, 16384, 64), 4),
    Case("attention_with_key_mass", "B=2 H=8 N=1024 D=64", _attention(2, 8, 1024, 64), 2),
    Case("attention_with_key_mass", "B=2 H=8 N=256 D=128", _attention(2, 8, 256, 128), 2),
    Case("attention_with_key_mass", "B=2 H=8 N=256 D=160", _attention(2, 8, 256, 160), 2),
    Case("attention_with_key_mass", "B=1 H=5 N=77 D=40", _attention(1, 5, 77, 40)),
    Case("sag_degrade", "B=256 C=3 32x32 k9", _sag(256, 3, 32, 8, 9, 1.0), 256),
    Case("sag_degrade", "B=256 C=3 64x64 k9", _sag(256, 3, 64, 16, 9, 1.0), 256),
    Case("sag_degrade", "B=256 C=3 64x64 k31", _sag(256, 3, 64, 16, 31, 3.0), 256),
    Case("sag_degrade", "B=2 C=4 64x64 k9", _sag(2, 4, 64, 32, 9, 1.0), 2),
    Case("sag_degrade", "B=1 C=3 30x30 k9", _sag(1, 3, 30, 6, 9, 1.0)),
    Case("sinkhorn", "512x5000", _sinkhorn(512, 5000), 512),
    Case("sinkhorn", "1024x10000", _sinkhorn(1024, 10000), 1024),
    Case("sinkhorn", "4096x10000", _sinkhorn(4096, 10000), 4096),
    Case("sinkhorn", "256x100", _sinkhorn(256, 100), 256),
    Case("sinkhorn", "37x101", _sinkhorn(37, 101)),
    Case("kmeans_assign", "N=1M d=768 K=10k", _kmeans(1_000_000, 768, 10_000), 1_000_000),
    Case("kmeans_assign", "N=100k d=384 K=1k", _kmeans(100_000, 384, 1_000), 100_000),
    Case("kmeans_assign", "N=1000 d=20 K=37", _kmeans(1000, 20, 37)),
)


@dataclasses.dataclass
class Captured:
    case: Case
    dtype: torch.dtype
    launch: Any  # _capture.Launch


def collect(cases, dtypes, pattern: str = ""):
    """(launches, rejected): every launch of every case and accepted dtype whose op or kernel
    name contains ``pattern``; ``rejected`` lists the dtypes an entry point refused."""
    found, rejected = [], []
    for case in cases:
        for dtype in dtypes:
            try:
                launches = capture(lambda: case.call(dtype))
            except (TypeError, ValueError) as e:  # the entry point's own input check
                rejected.append(dict(op=case.op, shape=case.shape, dtype=_name(dtype), error=str(e)))
                continue
            found += [Captured(case, dtype, l) for l in launches
                      if pattern in case.op or pattern in l.name]
    return found, rejected


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_JOBS: list = []  # (Captured, cc) per distinct compile; read by forked pool workers by index


def jobs(found, targets) -> list[list]:
    """Group captured launches by compile key: one compile per group and target."""
    groups: dict[str, list] = {}
    for cc in targets:
        for c in found:
            groups.setdefault(compile_key(c.launch, cc) + _name(c.dtype), []).append((c, cc))
    return list(groups.values())


def _compile_job(index: int) -> dict:
    captured, cc = _JOBS[index][0]
    try:
        return compile_and_read(captured.launch, cc)
    except Exception as e:  # reported as a row: "every kernel compiles" is what is audited
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def compile_all(groups, workers: int) -> list[dict]:
    """Compile every group in ``workers`` forked processes, with a fresh, discarded cache."""
    _JOBS[:] = groups
    figures = []
    with tempfile.TemporaryDirectory(prefix="sgengine-audit-") as cache, \
            mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1"):
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for one in pool.map(_compile_job, range(len(groups))):
                figures.append(one)
                if len(figures) % 50 == 0:
                    print(f"audit: {len(figures)}/{len(groups)} compiled", file=sys.stderr, flush=True)
    return [_row(group, fig) for group, fig in zip(groups, figures)]


def _row(group, figures: dict) -> dict:
    captured, cc = group[0]
    launch = captured.launch
    _, options, _, constexprs, _ = specialise(launch, cc)
    row = dict(kernel=launch.name, target=f"sm_{cc}", dtype=_name(captured.dtype),
               config=config_text(launch, options, constexprs), registers=None, spill_bytes=None,
               local_ldst=None, shared_bytes=None, shared_limit=SHARED_LIMIT[cc], mma=None,
               selectable=None, op=captured.case.op, module=launch.kernel.fn.__module__,
               shapes=sorted({c.case.shape for c, _ in group}), tuned=launch.tuned is not None,
               stack_bytes=None, dots=None, error=None)
    row.update(figures)
    if row["error"] is None:  # the autotuner skips a config that does not fit on the device
        row["selectable"] = not row["tuned"] or row["shared_bytes"] <= row["shared_limit"]
    return row


_NUMERIC = ("registers", "spill_bytes", "local_ldst", "shared_bytes", "stack_bytes", "dots")


def merge(rows) -> list[dict]:
    """One row per (kernel, target, dtype, config): the worst over its specialisations."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row["module"], row["kernel"], row["target"], row["dtype"], row["config"])
        if key not in merged:
            merged[key] = dict(row)
            continue
        m = merged[key]
        m["shapes"] = sorted(set(m["shapes"]) | set(row["shapes"]))
        m["error"] = m["error"] or row["error"]
        if m["error"] is None:
            for f in _NUMERIC:
                m[f] = max(m[f], row[f])
            m["mma"] = min(m["mma"], row["mma"], key=MMA_FAMILIES.index)
            m["selectable"] = m["selectable"] and row["selectable"]
    return list(merged.values())


def occupancy(found) -> list[dict]:
    """Programs per launch at each benchmark size, over the launch's configs, against SMs."""
    spans: dict[tuple, list] = {}
    for c in found:
        if c.case.batch is not None:
            key = (c.case.op, c.case.shape, c.case.batch, c.launch.name, _name(c.dtype))
            spans.setdefault(key, []).append(c.launch.programs())
    return [dict(op=op, shape=shape, batch=batch, kernel=kernel, dtype=dtype,
                 programs_min=min(p), programs_max=max(p),
                 under_one_wave=[gpu for gpu, sms in SMS.items() if min(p) < sms])
            for (op, shape, batch, kernel, dtype), p in spans.items()]


def unlaunched(found) -> list[str]:
    """Triton kernels in the package that no case launches and no other kernel calls, and
    modules of the package that do not import (their kernels cannot be audited)."""
    from triton.runtime.jit import JITFunction

    import sgengine.kernels as package
    jitted, broken = {}, []
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as e:
            broken.append(f"{package.__name__}.{info.name} does not import: {type(e).__name__}: {e}")
            continue
        jitted.update({f"{module.__name__}.{name}": fn for name, fn in vars(module).items()
                       if isinstance(fn, JITFunction) and fn.fn.__module__ == module.__name__})
    launched = {c.launch.kernel for c in found}
    called = lambda fn: any(f"{fn.fn.__name__}(" in other.src  # noqa: E731
                            for other in jitted.values() if other is not fn)
    return broken + sorted(name for name, fn in jitted.items() if fn not in launched and not called(fn))


def _cell(rows) -> str:
    """Worst figures of a set of rows: 'regs R, spill S B, ldst L, smem X/Y KiB, MMA'."""
    if any(r["error"] for r in rows):
        return "COMPILE ERROR"
    worst = {f: max(r[f] for r in rows) for f in ("registers", "spill_bytes", "local_ldst", "shared_bytes")}
    mma = "/".join(sorted({r["mma"] for r in rows}, key=MMA_FAMILIES.index))
    return (f"{worst['registers']} regs, spill {worst['spill_bytes']} B, ldst {worst['local_ldst']}, "
            f"smem {worst['shared_bytes'] / 1024:.0f}/{rows[0]['shared_limit'] // 1024} KiB, {mma}")


def summary_table(rows, targets) -> list[str]:
    """Markdown: one line per (kernel, dtype), one column per target (selectable configs only)."""
    keys = sorted({(r["op"], r["kernel"], r["dtype"]) for r in rows})
    head = ["| kernel | dtype | configs (selectable) |"] + [f" sm_{cc} |" for cc in targets]
    lines = ["".join(head), "|" + " --- |" * (3 + len(targets))]
    for op, kernel, dtype in keys:
        mine = [r for r in rows if (r["op"], r["kernel"], r["dtype"]) == (op, kernel, dtype)]
        cells = []
        for cc in targets:
            at = [r for r in mine if r["target"] == f"sm_{cc}"]
            chosen = [r for r in at if r["selectable"] is not False] or at
            cells.append(_cell(chosen) if chosen else "-")
        n = len({r["config"] for r in mine})
        sel = len({r["config"] for r in mine if r["selectable"]})
        lines.append(f"| {kernel} | {dtype} | {n} ({sel}) | " + " | ".join(cells) + " |")
    return lines


def occupancy_table(occ) -> list[str]:
    """Markdown: programs per launch at each benchmark size (dtypes with equal grids share a
    line); waves of the smallest grid, '< 1 wave' on GPUs it cannot fill."""
    lines = ["| op | size | kernel | dtypes | programs | " + " | ".join(f"{g} ({n} SMs)" for g, n in SMS.items())
             + " |", "|" + " --- |" * (5 + len(SMS))]
    dtypes: dict[tuple, list] = {}
    for o in occ:
        key = (o["op"], o["shape"], o["kernel"], o["programs_min"], o["programs_max"])
        dtypes.setdefault(key, []).append(o["dtype"])
    for (op, shape, kernel, lo, hi), names in dtypes.items():
        waves = [f"{lo / n:.2f}" + (" < 1 wave" if lo < n else "") for n in SMS.values()]
        lines.append(f"| {op} | {shape} | {kernel} | {', '.join(names)} | {lo}" + (f"-{hi}" if hi != lo else "")
                     + " | " + " | ".join(waves) + " |")
    return lines


def row_table(rows) -> list[str]:
    lines = ["| kernel | target | dtype | config | regs | spill B | ldst | smem B | limit | mma | sel |",
             "|" + " --- |" * 11]
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["target"], r["dtype"], r["config"])):
        lines.append("| " + " | ".join(str(r[f]) for f in (
            "kernel", "target", "dtype", "config", "registers", "spill_bytes", "local_ldst",
            "shared_bytes", "shared_limit", "mma", "selectable")) + (f" | {r['error']}" if r["error"] else " |"))
    return lines


def audit(targets=TARGETS, pattern: str = "", workers: int = 2) -> dict:
    """Capture, compile and read everything; the JSON document."""
    import triton

    found, rejected = collect(CASES, DTYPES, pattern)
    missing = [] if pattern else unlaunched(found)
    groups = jobs(found, targets)
    print(f"audit: {len(found)} launches, {len(groups)} compiles on {workers} workers", file=sys.stderr)
    rows = merge(compile_all(groups, workers))
    return dict(triton=triton.__version__, torch=torch.__version__, targets=[f"sm_{cc}" for cc in targets],
                rows=rows, occupancy=occupancy(found), rejected=rejected, unlaunched=missing)


def _check_compiled_kernels() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the audit compiles kernels for GPUs: run it without TRITON_INTERPRET "
                         "(e.g. env -u TRITON_INTERPRET python -m sgengine.kernels.audit)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sgengine.kernels.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)),
                        help="compute capabilities, e.g. 80,86,89,90")
    parser.add_argument("--kernels", default="", help="only ops or kernels whose name contains this")
    parser.add_argument("--json", help="write the rows, occupancy and coverage to this file")
    parser.add_argument("--markdown", action="store_true", help="print only the README tables")
    parser.add_argument("--rows", action="store_true", help="also print every (kernel, config) row")
    parser.add_argument("--workers", type=int, default=2, help="parallel compiles")
    parser.add_argument("--render", metavar="JSON", help="print the tables of an earlier --json run")
    return parser


def _targets(parser, text: str) -> tuple[int, ...]:
    targets = tuple(int(t) for t in text.split(",") if t.strip().isdigit())
    if not targets or set(targets) - set(SHARED_LIMIT) or len(targets) != len(text.split(",")):
        parser.error(f"--targets {text!r}: give compute capabilities from {sorted(SHARED_LIMIT)}, e.g. 80,90")
    return targets


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        _print(doc, tuple(int(t.removeprefix("sm_")) for t in doc["targets"]), args)
        return 0
    targets = _targets(parser, args.targets)
    _check_compiled_kernels()
    doc = audit(targets, args.kernels, args.workers)
    _print(doc, targets, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def _print(doc, targets, args) -> None:
    lines = summary_table(doc["rows"], targets) + [""] + occupancy_table(doc["occupancy"])
    if not args.markdown:
        lines = [f"triton {doc['triton']}, torch {doc['torch']}", ""] + lines
        lines += [""] + row_table(doc["rows"]) if args.rows else []
        lines += [f"rejected: {r}" for r in doc["rejected"]]
        lines += [f"NOT LAUNCHED by any case (add one to CASES): {k}" for k in doc["unlaunched"]]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
