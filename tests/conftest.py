"""Fixtures and set-up of every test. Helpers that tests import live in sgtest.py: a test module
importing from ``conftest`` would get benchmarks/conftest.py when one pytest call collects both.
"""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory (the repo root) on sys.path, and there the repo's
# top-level kernels/ (installed as sgengine.kernels) shadows Hugging Face's `kernels` package, which
# transformers >= 5 requires and probes on import (diffusers' pipelines then fail to import).
# sgengine itself is imported from its installation (`pip install -e .`), so the root can go.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# The Triton interpreter must be on before triton is imported, so that
# backend="triton" can run on CPU tensors in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Respect OMP_NUM_THREADS (set it to 1 on a shared, oversubscribed machine); else 2 cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For files of many tiny ops, where a second intra-op thread costs more in synchronisation
    than it gives (5-10x slower on a loaded 2-core machine). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
