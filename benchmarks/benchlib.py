"""Helpers the benchmarks import (``from benchlib import ...``; conftest.py holds the pytest hooks).

Every benchmark times sgengine and its baseline on the same inputs, synchronises the
device inside the timed function, and records the GPU name, dtype and a derived
throughput in ``benchmark.extra_info``. Without a GPU only a tiny smoke size runs.
"""
from __future__ import annotations

import json
import os

import torch

# SG_BENCH_SMOKE=1 (benchmarks/runbook.py --smoke) keeps the tiny CPU sizes on a GPU machine too.
ON_GPU = torch.cuda.is_available() and not os.environ.get("SG_BENCH_SMOKE")
if not ON_GPU:
    # Triton kernels run on CPU tensors only under the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from roofline import Work, roofline_info  # noqa: E402
from sgengine.kernels._budget import max_err, within_budget  # noqa: E402 - after TRITON_INTERPRET

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu (smoke size only)"


def sizes(gpu_sizes: list, smoke_size) -> list:
    """The GPU sizes on a GPU, else one tiny size so the benchmark cannot rot."""
    return gpu_sizes if ON_GPU else [smoke_size]


def timed(fn):
    """Wrap ``fn`` so that the device is synchronised inside the timed call."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out
    return run


def peak_memory(fn, *args, **kwargs) -> float:
    """Peak device memory in GB allocated while running ``fn`` once (0 on CPU)."""
    if not ON_GPU:
        fn(*args, **kwargs)
        return 0.0
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args, **kwargs)
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def seconds(benchmark) -> float | None:
    """The row's mean time, or None under --benchmark-disable (the runbook's correctness pass
    runs every case once, untimed, for its error-budget checks)."""
    return benchmark.stats.stats.mean if benchmark.stats is not None else None


def best_seconds(benchmark) -> float | None:
    """The row's fastest round, or None under --benchmark-disable (as ``seconds``)."""
    return benchmark.stats.stats.min if benchmark.stats is not None else None


def per_second(amount: float, benchmark, unit: float = 1.0) -> float | None:
    """amount / mean time / unit (a throughput), None when the row was not timed."""
    mean = seconds(benchmark)
    return amount / mean / unit if mean else None


def record(benchmark, work: Work | None = None, **info) -> None:
    """Attach device, dtype, derived throughputs and, given the case's ``work`` (roofline.py),
    its FLOPs, bytes and percentage of the roofline bound on a known GPU to the benchmark row."""
    if work is not None:
        info.update(roofline_info(work, device_name(), seconds(benchmark)))
    benchmark.extra_info.update(device=device_name(), **info)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    stream({"kind": "row", "name": benchmark.name, "fullname": benchmark.fullname, "params": benchmark.params,
             "stats": stats and {k: getattr(stats, k) for k in ("mean", "min", "median", "stddev", "rounds")},
             "extra_info": benchmark.extra_info})


def check_budget(benchmark, name: str, got, ref_low, truth, floor: float) -> None:
    """The error-budget rule on the device at the benchmark's size (compiled kernels, not the
    interpreter): recorded as ``<name>_max_err`` / ``<name>_ref_max_err`` and asserted."""
    err, ref_err = max_err(got, truth), max_err(ref_low, truth)
    benchmark.extra_info.update({f"{name}_max_err": err, f"{name}_ref_max_err": ref_err})
    assert within_budget(got, ref_low, truth, floor), f"{name}: error {err:.3g} > 2 x {ref_err:.3g} + {floor:g}"


def stream(entry: dict) -> None:
    """Append one JSON line to $SG_BENCH_STREAM (set by benchmarks/runbook.py): rows and test
    outcomes survive a run that is killed at its time limit, unlike --benchmark-json."""
    path = os.environ.get("SG_BENCH_STREAM")
    if path:
        with open(path, "a") as fh:  # one short line a write: no interleaving within one process
            fh.write(json.dumps(entry, default=lambda o: f"UNSERIALIZABLE[{o}]") + "\n")


def cpu_model() -> str:
    """/proc/cpuinfo's model name with family and model (a VM may show only "AMD EPYC"): a CPU figure
    means nothing without it."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def torch_blas() -> str:
    """torch's BLAS with its version where torch's build config names one (MKL x.y / OpenBLAS x.y)."""
    import re
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version (\S+?)-", config)
    found = re.search(r"BLAS_INFO=(\w+)", config)
    return f"MKL {mkl.group(1)}" if mkl else (found.group(1) if found else "unknown")
