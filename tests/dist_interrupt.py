"""Run under torchrun by tests/test_run_faults.py: the train CLI three times in one launch (a launch
with DeepSpeed costs more than the training): straight to ``--steps`` in OUT/straight; in
OUT/stopped with a real SIGINT sent to rank 1 alone inside the forward of step 2; then
``--resume`` there. Every rank writes ``rank<R>.json``: the three exit codes, its stderr lines of the interrupt and
the checkpoints with DeepSpeed state after it.

    torchrun --nproc_per_node=2 tests/dist_interrupt.py OUT [train flags]
"""
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path


def main(out: Path, flags: list[str]) -> None:
    from sgengine.models.unet import UNet
    from sgengine.train import main as train

    rank, codes, lines = int(os.environ["RANK"]), [], []
    codes.append(train([*flags, "--out", str(out / "straight")]))
    real, calls = UNet.forward, []

    def forward(self, *args, **kwargs):  # the forward of the second step, on rank 1 only
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    UNet.forward = forward
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes.append(train([*flags, "--out", str(out / "stopped")]))
    UNet.forward = real
    lines += [line.split("\r")[-1] for line in err.getvalue().splitlines() if "interrupt" in line]
    ckdir = out / "stopped" / "ckpt"
    saved = sorted(p.relative_to(ckdir).as_posix() for p in ckdir.glob("step_*/deepspeed"))
    codes.append(train([*flags, "--out", str(out / "stopped"), "--resume"]))
    (out / f"rank{rank}.json").write_text(json.dumps({"codes": codes, "lines": lines, "saved": saved}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), sys.argv[2:])
