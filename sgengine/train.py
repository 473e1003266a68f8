"""``python -m sgengine.train``: train a self-guided diffusion model.

With no arguments it trains self-labeled guidance on scikit-learn's digits on the CPU
in a few minutes and prints where the checkpoint, sample grid and metrics are.
"""
from __future__ import annotations

import sys

from .config import parse_args
from .training.trainer import NonFiniteLoss, Trainer


def _trainer_class(cfg):
    """OnlineTrainer for online self-guidance (SPEC section 2), else the base trainer."""
    if cfg.online.enabled:
        from .online.trainer import OnlineTrainer
        return OnlineTrainer
    return Trainer


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        trainer = _trainer_class(cfg)(cfg)
        out = trainer.run()
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not trainer.dist.main:
        return 0
    print(f"done: {trainer.step} steps in {cfg.out}")
    for name, path in out.items():
        print(f"  {name:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
