"""``python -m sgengine.train``: train a self-guided diffusion model.

With no arguments it trains self-labeled guidance on scikit-learn's digits on the CPU
in a few minutes and prints where the checkpoint, sample grid and metrics are.

The CLI orchestrates (architecture.md): it checks every output location, makes the self-labels
(k-means on pixel features) once, and then hands the annotation file to the trainer, which
never calls annotate itself. Under torchrun only rank 0 clusters, before any process group
exists, so k-means runs as one process with no collective; the other ranks wait in the process
group's rendezvous and read the finished file.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .checkpoint import latest_checkpoint
from .common import runlock
from .common.flags import EXIT_INTERRUPTED, error_line, run_cli
from .common.io import DiskFull
from .common.paths import check_writable
from .common.ranks import dist_info, world_size
from .config import TrainConfig, parse_args
from .data import load_data
from .training.interrupt import Interrupted
from .training.trainer import SELF_LABELS_FILE, NonFiniteLoss, Trainer, resolve_model


def _trainer_class(cfg):
    """OnlineTrainer for online self-guidance (SPEC section 2), else the base trainer."""
    if cfg.online.enabled:
        from .online.trainer import OnlineTrainer
        return OnlineTrainer
    return Trainer


def check_outputs(cfg: TrainConfig) -> None:
    """Every location the run writes, checked before data loading, k-means or training (rank 0 writes)."""
    if not dist_info().main:
        return
    out, fix = Path(cfg.out), "choose another --out"
    check_writable(out, "--out", fix)
    for sub in ("ckpt", "samples"):
        check_writable(out / sub, f"--out's {sub}/ folder", fix)
    files = ["loss.png", "samples.png", "metrics.jsonl", "ckpt/latest"] + ["cluster_usage.png"] * cfg.online.enabled
    for name in files:  # a folder in a file's place would fail at the first checkpoint or at the end
        check_writable(out / name, "--out's file", f"{fix}, or move that folder away", folder=False)
    if cfg.condition == "self-labels":
        check_writable(out / SELF_LABELS_FILE, "the self-label file", fix, folder=False)


def self_labels(cfg: TrainConfig, log=print) -> Path | None:
    """Make ``--out/annotations.safetensors`` for a self-labels run (once; kept for resumption): k-means
    (K = cfg.k, 30 iterations) on pixel features, PCA-projected when cfg.pca_dim. Rank 0 only."""
    if cfg.condition != "self-labels":
        return None
    path = Path(cfg.out) / SELF_LABELS_FILE
    if path.is_file() or not dist_info().main:
        return path
    if world_size() > 1:  # k-means would be a collective that only this rank joins
        raise RuntimeError("make the self-labels before the process group starts (sgengine.train.self_labels)")
    from .annotate.io import save_annotations
    from .annotate.labels import pixel_self_labels

    net = cfg.network
    data = load_data(cfg.data, net.img_size, net.in_channels, resize=cfg.data_resize)
    resolve_model(cfg, None, data)  # data the network cannot take is refused before k-means, not after
    save_annotations(path, pixel_self_labels(data.images, cfg.k, cfg.pca_dim, cfg.seed, cfg.data))
    features = f"PCA-{cfg.pca_dim} of pixels" if cfg.pca_dim else "pixels"
    log(f"self-labels: k-means (K={cfg.k}) on {features} of {len(data)} images -> {path}")
    return path


def train(cfg: TrainConfig, log=print) -> tuple[Trainer, dict]:
    """The whole run as the CLI does it: output checks, the run lock, self-labels, training. Returns
    the trainer and its outputs (checkpoint, grid, metrics)."""
    check_outputs(cfg)
    main_rank = dist_info().main
    if main_rank:  # before k-means: a second run on this --out is refused before any work
        runlock.acquire(cfg.out, log)
    try:
        self_labels(cfg, log)
        trainer = _trainer_class(cfg)(cfg, log=log)  # reads --out/annotations.safetensors for self-labels
        return trainer, trainer.run()
    finally:
        if main_rank:
            runlock.release(cfg.out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    try:
        trainer, out = train(cfg)
    except NonFiniteLoss as err:
        print(error_line(err), file=sys.stderr)
        return 3
    except DiskFull as err:
        print(f"error: {err}; {_last_intact(cfg)}: free space there, then continue with: {resume_command(argv)}",
              file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, ImportError) as err:  # OSError: missing, existing, unwritable files
        print(error_line(err), file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as err:
        if dist_info().main:
            print(interrupted_line(err, cfg, argv), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not trainer.dist.main:
        return 0
    print(f"done: {trainer.step} steps in {cfg.out}")
    for name, path in out.items():
        print(f"  {name:12s} {path}")
    return 0


def interrupted_line(err: BaseException, cfg: TrainConfig, argv: list[str]) -> str:
    """The one line of a Ctrl-C: the step the run stopped at, what was saved, the resume command."""
    if isinstance(err, Interrupted) and not err.at_once:
        return f"interrupted: stopped after step {err.step}, saved {err.checkpoint}; resume with: {resume_command(argv)}"
    last = latest_checkpoint(cfg.out) if Path(cfg.out).is_dir() else None
    when = (f"stopped at once after step {err.step}, without its checkpoint" if isinstance(err, Interrupted)
            else "stopped before training started")
    if last is None:
        return f"interrupted: {when}; nothing to resume in {cfg.out}; start again with: {_command(argv)}"
    return f"interrupted: {when}; the last checkpoint is {last}; resume with: {resume_command(argv)}"


def _last_intact(cfg: TrainConfig) -> str:
    last = latest_checkpoint(cfg.out) if Path(cfg.out).is_dir() else None
    return f"the last intact checkpoint is {last}" if last else "no checkpoint was written yet"


def resume_command(argv: list[str]) -> str:
    """This run's command line with --resume (torchrun's part for a run of several ranks)."""
    return _command(argv if "--resume" in argv else [*argv, "--resume"])


def _command(argv: list[str]) -> str:
    info = dist_info()
    if info.world == 1:
        launcher = "python -m sgengine.train"
    elif info.world == int(os.environ.get("LOCAL_WORLD_SIZE", info.world)):
        launcher = f"torchrun --nproc_per_node={info.world} -m sgengine.train"
    else:
        launcher = "torchrun <the same torchrun options> -m sgengine.train"
    return " ".join([launcher, *map(shlex.quote, argv)])


if __name__ == "__main__":
    run_cli(main)
