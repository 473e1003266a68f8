"""Training metrics: JSONL always, TensorBoard when installed, a loss curve as PNG."""
from __future__ import annotations

import json
from pathlib import Path

from ..common.io import append_line, atomic_write
from ..viz import plot_curve, read_jsonl


class MetricsLogger:
    def __init__(self, out: Path, resume_step: int | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        elif resume_step is None:
            atomic_write(self.path, lambda tmp: tmp.write_text(""))
        self.tb = self._tensorboard(out)

    def _truncate(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from: they will be redone."""
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    @staticmethod
    def _tensorboard(out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(Path(out) / "tb"))

    def log(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def histogram(self, key: str, values, step: int) -> None:
        """A distribution to TensorBoard, when installed (the JSONL holds the raw values)."""
        if self.tb is not None:
            self.tb.add_histogram(key, values, step)

    def plot(self, png: Path, key: str = "loss") -> Path | None:
        rows = [r for r in read_jsonl(self.path) if key in r]
        if len(rows) < 2:
            return None
        return plot_curve([r["step"] for r in rows], [r[key] for r in rows], png, f"training {key}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
