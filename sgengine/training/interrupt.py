"""Ctrl-C (SIGINT) as a request to stop at the next step boundary, agreed by every rank.

A KeyboardInterrupt raised wherever the signal lands (inside a forward, between an optimizer step
and the step counter, in the middle of a checkpoint) leaves the run's state half-way through a step:
the batch generator already drew the next batch, the weights may be updated while the step is not
counted. So the handler only sets a flag; the loop asks ``StopRequest.due()`` after each whole step,
and a run that stops writes the checkpoint of that step with the random state of that boundary,
from which ``--resume`` continues bit for bit.

Under torchrun the ranks must stop at the same step (the checkpoint is collective) though the
signal may reach one rank only (``kill -INT``) or all at slightly different times (torchrun
forwards its own). Each rank hands its flag to an all-reduce (max) on a CPU process group at every
boundary and reads the result at the next one: every rank sees the same answer at the same step,
and no boundary waits for the others (the reduce had a whole step to finish).

A second Ctrl-C raises KeyboardInterrupt at once (the previous handler is back after the first):
the run then stops without a new checkpoint and resumes from the last one written.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ..common import ranks


class Interrupted(Exception):
    """Training stopped on Ctrl-C: ``step`` is the last step done, ``checkpoint`` the newest intact
    checkpoint (that step's unless ``at_once``: the second Ctrl-C that stopped before writing it)."""

    def __init__(self, step: int, checkpoint: Path | None, at_once: bool = False):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.at_once = step, checkpoint, at_once


class StopRequest:
    """The SIGINT flag of one training loop and its agreement across ranks; a context manager that
    installs the handler (main thread only: signals are delivered there) and restores the old one."""

    def __init__(self):
        self.flag, self.previous, self.pending = False, None, None
        self.group = dist.new_group(backend="gloo") if ranks.world_size() > 1 else None  # collective

    def __enter__(self) -> StopRequest:
        # Installed even over SIG_IGN (a script's background job): an explicit kill -INT still means stop.
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self.previous)
        self.previous = None
        if self.pending is not None and exc[0] is None:  # every rank issued it: finish it together
            self.pending[0].wait()
        self.pending = None

    def _handle(self, signum, frame) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)  # a second Ctrl-C: at once

    def due(self) -> bool:
        """Whether to stop at this boundary; every rank must call it at every boundary."""
        if self.group is None:
            return self.flag
        agreed = False
        if self.pending is not None:
            work, box = self.pending
            work.wait()
            agreed = bool(box.item())
        self.pending = None
        if not agreed:
            box = torch.tensor([int(self.flag)])
            self.pending = (dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group, async_op=True), box)
        return agreed
