"""Helpers that test modules import (``from sgtest import ...``): a name of its own, unlike
``conftest``, which benchmarks/ has too."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch


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


def tiny_online_run(out: Path, steps: int, batch_size: int, sample_steps: int, grid: int) -> Path:
    """A short online (U-ViT, prototype) run through the train CLI, across its stage switch, logging
    twice, with a ``grid`` x ``grid`` sample grid; returns its folder."""
    from sgengine.train import main as train_main

    rc = train_main(["--preset", "uvit-tiny-online", "--out", str(out), "--device", "cpu", "--steps", str(steps),
                     "--batch_size", str(batch_size), "--log_every", str(steps // 2), "--ckpt_every", "0",
                     "--sample_steps", str(sample_steps), "--grid_rows", str(grid), "--grid_cols", str(grid)])
    assert rc == 0
    return out
