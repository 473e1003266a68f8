import os

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
