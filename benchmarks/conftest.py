"""pytest hooks and fixtures of the benchmark suite (`pytest benchmarks --benchmark-only`); the
helpers benchmarks import live in benchlib.py (imported first: it turns the Triton interpreter on
without a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from benchlib import DEVICE, stream

# As in tests/conftest.py: under `python -m pytest` the repo root's kernels/ would shadow Hugging Face's
# `kernels`, which transformers >= 5 imports (diffusers' SD3 / Flux models in bench_pipeline_sag.py).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def pytest_runtest_logreport(report) -> None:
    """Each test's outcome (and the failure's last lines) into the stream."""
    if report.when == "call" or report.outcome != "passed":
        message = report.longreprtext.strip().splitlines()[-3:] if report.failed or report.skipped else []
        stream({"kind": "outcome", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": report.duration, "message": "\n".join(message)})


@pytest.fixture
def device():
    return DEVICE
