"""Run by tests/test_faults.py: train the tiny preset and SIGKILL this very process in the middle of
the checkpoint of step ``--kill_at`` (after its weights are written, before state.pt and meta.json):
a kill -9 at the worst moment, reproducibly."""
import dataclasses
import os
import signal
import sys

import torch

from sgengine.config import preset
from sgengine.training.trainer import Trainer


def main(out: str, kill_at: int) -> None:
    cfg = dataclasses.replace(preset("tiny"), out=out, condition="labels", steps=2 * kill_at, ckpt_every=kill_at // 2)
    tr = Trainer(cfg, log=lambda *a: None)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if tr.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    torch.save = save
    tr.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
