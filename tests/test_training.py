import dataclasses
import os
import sys

import pytest
import torch
from sgtest import assert_resume_is_exact
from torch import nn

from sgengine.config import parse_args, preset
from sgengine.sampling import load_generator
from sgengine.checkpoint import latest_checkpoint
from sgengine.training.ema import ema_decay, ema_update
from sgengine.training.trainer import NonFiniteLoss, Trainer
from sgengine.viz import read_jsonl


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), condition="labels")
    return dataclasses.replace(preset("tiny"), **{**base, **kw})


def test_ema_rule():
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(90) == pytest.approx(91 / 100)
    assert ema_decay(10**7) == 0.9999
    ema, live = nn.Linear(3, 2), nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    ema_update(ema, live, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * live.weight.detach())


def test_smoke_30_steps_lowers_the_loss(tmp_path):
    out = Trainer(_cfg(tmp_path)).run()
    losses = [r["loss"] for r in read_jsonl(out["metrics"])]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    assert out["grid"].exists() and out["curve"].exists()


def _params(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_checkpoint_round_trip_gives_the_ema_weights(tmp_path):
    tr = Trainer(_cfg(tmp_path, steps=6))
    tr.run()
    gen = load_generator(tmp_path / "run")
    for k, v in _params(tr.ema).items():
        torch.testing.assert_close(gen.net.state_dict()[k], v, rtol=0, atol=0)
    assert gen.counts.sum() == 1797 and gen.k == 10


def test_resume_reaches_the_same_parameters(tmp_path):
    _, resumed = assert_resume_is_exact(Trainer, _cfg(tmp_path, steps=20), kill_at=10)
    steps = [r["step"] for r in read_jsonl(resumed.out / "metrics.jsonl")]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_existing_run_needs_resume_and_the_same_model_and_data(tmp_path):
    Trainer(_cfg(tmp_path, steps=2, ckpt_every=2)).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(tmp_path, steps=4))
    with pytest.raises(ValueError, match=r"different model or data \(--hflip False -> True, --model.channels 16 -> 8\)"):
        Trainer(_cfg(tmp_path, steps=4, hflip=True, model=dataclasses.replace(preset("tiny").model, channels=8),
                     resume=True))


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(_cfg(tmp_path, steps=10, ckpt_every=2))
    real = tr.loss_fn

    def poisoned(net, x, **kw):
        loss = real(net, x, **kw)
        return loss * float("nan") if tr.step == 4 else loss

    tr.loss_fn = poisoned
    with pytest.raises(NonFiniteLoss, match="at step 5.*step_00000004"):
        tr.run()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"


def test_nan_between_log_points_is_named_at_the_next_one(tmp_path):
    """The loss is read only at log points (tiny: every 5 steps), yet the first bad step is named."""
    tr = Trainer(_cfg(tmp_path, steps=10, ckpt_every=0))
    real = tr.loss_fn
    tr.loss_fn = lambda net, x, **kw: real(net, x, **kw) * (float("inf") if tr.step == 1 else 1.0)
    with pytest.raises(NonFiniteLoss, match="loss became inf at step 2; no checkpoint was written yet"):
        tr.run()
    assert tr.step == 5


def test_train_step_never_waits_for_the_host_or_the_other_ranks(tmp_path, monkeypatch):
    """No tensor is read on the host and nothing is reduced over ranks inside a step: a CUDA (graph)
    run keeps queueing work; the loss is read once per log point."""
    from sgengine.common import ranks

    tr, reads = Trainer(_cfg(tmp_path, steps=4, grad_accum=2)), []

    def watch(name, real):
        def read(self, *a):
            caller = sys._getframe(1).f_code.co_filename  # torch's own CPU Adam reads its step count: not ours
            if f"{os.sep}sgengine{os.sep}" in caller:
                reads.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *a)
        return read

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, watch(name, getattr(torch.Tensor, name)))
    for name in ("sum_over_ranks", "min_over_ranks", "mean_over_ranks"):
        monkeypatch.setattr(ranks, name, lambda *a, _n=name: reads.append(_n))
    loss = tr.train_step()
    assert reads == [] and loss.dim() == 0
    monkeypatch.undo()
    assert torch.isfinite(loss) and tr._check_loss() == pytest.approx(float(loss))


def test_cli_overrides_and_unknown_keys():
    cfg = parse_args(["--preset", "tiny", "--steps", "7", "--model.channels", "8", "--hflip", "true"])
    assert (cfg.steps, cfg.model.channels, cfg.hflip) == (7, 8, True)
    with pytest.raises(SystemExit):
        parse_args(["--no-such-key", "1"])


def test_paper_preset_without_annotations_names_the_fix(tmp_path):
    cfg = dataclasses.replace(preset("in32"), out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="sgengine.annotate"):
        Trainer(cfg)
