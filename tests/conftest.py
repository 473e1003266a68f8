import os

# The Triton interpreter must be on before triton is imported, so that
# backend="triton" can run on CPU tensors in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

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


def torchrun(script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``tests/<script>`` on two ranks (torchrun, gloo on CPU, one thread each, Triton under
    the interpreter); fails the test with the tail of both streams unless every rank exits 0."""
    here = Path(__file__).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(here / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=here.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_resume_is_exact(make, cfg, kill_at: int):
    """Train ``cfg`` straight, and again stopped after step ``kill_at`` (a finished run, checkpoint
    at ``kill_at``) then continued with resume=True, under ``cfg.out``/straight and /killed: the
    net and EMA weights must agree bit for bit. ``make``: the trainer class. Returns both trainers."""
    import dataclasses

    out = Path(cfg.out)
    straight = make(dataclasses.replace(cfg, out=str(out / "straight"), ckpt_every=kill_at))
    straight.run()
    make(dataclasses.replace(cfg, out=str(out / "killed"), steps=kill_at, ckpt_every=kill_at)).run()
    resumed = make(dataclasses.replace(cfg, out=str(out / "killed"), ckpt_every=kill_at, resume=True))
    assert resumed.step == kill_at
    resumed.run()
    for mod in ("net", "ema"):
        want, got = getattr(straight, mod).state_dict(), getattr(resumed, mod).state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    return straight, resumed
