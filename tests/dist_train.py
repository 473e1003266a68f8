"""Run under torchrun by tests/test_distributed.py: train with sgengine's CLI flags.

Besides the run's own files, every rank writes ``rank<R>.json`` next to them: the global
rows and image indices of its first micro-batch and its first noise seed, so the test
can check that ranks draw distinct shards of one global batch.
"""
import json
import os
import sys
from pathlib import Path

from sgengine.config import parse_args
from sgengine.training import distributed as D
from sgengine.training.trainer import Trainer


def main(argv: list[str]) -> None:
    trainer = Trainer(parse_args(argv))
    if trainer.resumed_from is None:
        _record_first_shard(trainer)
    trainer.run()


def _record_first_shard(trainer: Trainer) -> None:
    trainer.batch(0)
    rows = D.shard_slice(trainer.cfg.batch_size, 0, trainer.dist)
    record = {"world": trainer.dist.world, "rows": [rows.start, rows.stop],
              "indices": trainer._draws[0][rows].tolist(),
              "seed": D.shard_seed(trainer.cfg.seed, trainer.step, 0, trainer.dist)}
    Path(trainer.cfg.out, f"rank{trainer.dist.rank}.json").write_text(json.dumps(record))
    trainer.g.manual_seed(trainer.cfg.seed)  # undo the peek: a fresh run starts from this state


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
