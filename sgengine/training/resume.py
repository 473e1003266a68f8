"""What ``--resume`` may trust and change: the newest intact checkpoint, the configuration fields a
resumed run may alter, and weights that are finite before they are written.

Optimiser settings (lr, warmup, clipping, weight decay, EMA rate) may change on resumption: that is
how a run that diverged is continued (lower --lr, then --resume). Fields that change the network,
the data or the objective may not: the saved weights and the drawn batches would no longer fit.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import newest_valid, no_checkpoint, set_aside
from ..common import ranks

# Fields that may differ between a run and its resumption without touching the optimisation.
RESUMABLE_CHANGES = {"steps", "resume", "out", "log_every", "sample_every", "ckpt_every", "device",
                     "keep_checkpoints", "grid_rows", "grid_cols", "sample_steps", "guidance_w", "sampler",
                     "eval_every", "eval_n", "eval_ref", "eval_features", "compile", "compile_mode",
                     "channels_last"}
# Optimiser settings a resumed run takes over (and reports): continuing a diverged run needs them.
OPTIMISER_CHANGES = {"lr", "warmup", "grad_clip", "weight_decay", "ema_max"}


def flat(d: dict, prefix: str = "") -> dict:
    """{'model': {'channels': 16}} -> {'model.channels': 16}: changes are named as flags."""
    out = {}
    for key, value in d.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """Optimiser settings that differ, {flag: (saved, now)}; raises for any change that would alter
    the model, the data or the objective (both dicts as ``config.to_dict`` gives them)."""
    saved, now = flat(saved), flat(now)
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    refused = sorted(k for k in diff if k.split(".")[0] not in RESUMABLE_CHANGES | OPTIMISER_CHANGES)
    if refused:
        shown = ", ".join(f"--{k} {diff[k][0]} -> {diff[k][1]}" for k in refused)
        raise ValueError(f"--resume with a different model or data ({shown}); use the original settings "
                         f"or a new --out (only {', '.join(sorted(OPTIMISER_CHANGES))} may change)")
    return {k: v for k, v in diff.items() if k in OPTIMISER_CHANGES}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changes.items()))


def apply_optimiser_settings(opt, sched, lr: float, weight_decay: float) -> None:
    """Replace the lr and weight decay that a loaded optimizer / LambdaLR state brought back; the
    warmup lambda and the clipping and EMA settings are read from the live configuration anyway."""
    for group in opt.param_groups:
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        sched.base_lrs = [lr] * len(opt.param_groups)
        for group, fn in zip(opt.param_groups, sched.lr_lambdas):
            group["lr"] = lr * fn(sched.last_epoch)


def resume_point(out: Path, log) -> Path | None:
    """The newest intact checkpoint of ``out`` (rank 0 decides, every rank gets its answer), or
    None for a run with no checkpoint yet. Damaged newer ones are reported and set aside (never
    deleted), so the resumed run writes their steps again."""
    found, skipped = ranks.from_main(newest_valid(out) if ranks.dist_info().main else None)
    if found is None and skipped:
        raise no_checkpoint(Path(out) / "ckpt", skipped)
    for folder, reason in skipped:
        where = set_aside(folder) if ranks.dist_info().main else folder
        log(f"--resume: skipping {folder}: {reason}; kept as {where.name}, resuming from {found.name}")
    return found


def nonfinite_counts(**state_dicts) -> dict[str, int]:
    """Non-finite values per named state dict; only the non-zero entries."""
    counts = {name: sum(int((~torch.isfinite(t)).sum()) for t in sd.values() if t.is_floating_point())
              for name, sd in state_dicts.items()}
    return {name: n for name, n in counts.items() if n}

