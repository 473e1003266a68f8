"""Fault injection (issue 13): kill -9 during a checkpoint write, truncated checkpoint files,
non-finite weights, outputs that cannot be written. Each asserts the one-line message and that
nothing older was lost."""
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgengine.checkpoint import damage, latest_checkpoint, load_weights, resolve_checkpoint
from sgengine.config import preset
from sgengine.train import main
from sgengine.training.trainer import NonFiniteLoss, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops


def _cfg(out, **kw):
    base = dict(out=str(out), condition="labels", steps=4, ckpt_every=2, sample_steps=2, grid_rows=2, grid_cols=1)
    return dataclasses.replace(preset("tiny"), **{**base, **kw})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A finished run with intact checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(_cfg(out), log=lambda *a: None).run()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt", "meta.json"])
def test_a_truncated_file_falls_back_to_the_older_step_and_keeps_it(two_steps, tmp_path, name):
    out = _copy(two_steps, tmp_path)
    newest, older = out / "ckpt" / "step_00000004", out / "ckpt" / "step_00000002"
    cut = newest / name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    kept, before = _snapshot(newest), _snapshot(older)
    assert name in damage(newest) and damage(older) is None
    assert latest_checkpoint(out) == older  # the sampler's and the evaluator's view too
    logs = []
    tr = Trainer(_cfg(out, resume=True), log=logs.append)
    assert tr.step == 2
    skip = next(line for line in logs if line.startswith("--resume: skipping"))
    assert str(newest) in skip and name in skip and "kept as damaged_step_00000004" in skip
    assert _snapshot(out / "ckpt" / "damaged_step_00000004") == kept  # set aside, never deleted
    tr.run()
    assert damage(newest) is None and _snapshot(older) == before


def test_a_corrupted_byte_is_caught_by_the_checksum(two_steps, tmp_path):
    out = _copy(two_steps, tmp_path)
    f = out / "ckpt" / "step_00000004" / "ema.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one weight byte flipped
    f.write_bytes(bytes(data))
    assert damage(f.parent) == "ema.safetensors does not match the checksum in meta.json (damaged)"
    with pytest.raises(ValueError, match=r"checkpoint .*step_00000004 is damaged: ema.safetensors"):
        resolve_checkpoint(f.parent)  # a step folder passed explicitly is refused, not replaced


def test_no_intact_step_is_a_one_line_error(two_steps, tmp_path, capsys):
    out = _copy(two_steps, tmp_path)
    for step in (2, 4):
        f = out / "ckpt" / f"step_{step:08d}" / "state.pt"
        f.write_bytes(f.read_bytes()[:100])
    before = _snapshot(out / "ckpt")
    assert main(["--preset", "tiny", "--condition", "labels", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no intact checkpoint under") and "\n" not in err
    assert "step_00000004: state.pt has 100 bytes but meta.json recorded" in err and "step_00000002" in err
    assert _snapshot(out / "ckpt") == before  # nothing moved, nothing deleted


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    script = Path(__file__).parent / "kill_during_write.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "4"], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = out / "ckpt"
    assert (ckdir / ".step_00000004.tmp" / "ema.safetensors").is_file()  # killed mid-write
    assert latest_checkpoint(out) == ckdir / "step_00000002" and damage(ckdir / "step_00000002") is None
    logs = []
    tr = Trainer(_cfg(out, steps=8, resume=True), log=logs.append)
    assert tr.step == 2 and any("resumed from" in line and "step_00000002" in line for line in logs)
    tr.run()
    assert damage(ckdir / "step_00000008") is None


def test_non_finite_weights_are_never_saved_and_resume_takes_a_lower_lr(two_steps, tmp_path):
    out = _copy(two_steps, tmp_path)
    good = _snapshot(out / "ckpt" / "step_00000004")
    tr = Trainer(_cfg(out, steps=8, ckpt_every=1, resume=True), log=lambda *a: None)
    tr.sched.base_lrs = [float("inf")] * len(tr.opt.param_groups)  # --lr inf itself is refused up front
    for group in tr.opt.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteLoss) as err:
        tr.run()
    msg = str(err.value)
    assert msg.startswith("the weights became non-finite by step 5 (") and "(non-finite values: " in msg and "in the model, " in msg
    assert f"nothing was saved, the last good checkpoint is {out / 'ckpt' / 'step_00000004'}" in msg
    assert "Lower --lr" in msg and "\n" not in msg
    assert latest_checkpoint(out).name == "step_00000004" and _snapshot(out / "ckpt" / "step_00000004") == good
    logs = []
    tr = Trainer(_cfg(out, steps=6, lr=1e-3, warmup=2, ema_max=0.99, resume=True), log=logs.append)
    assert "--resume: optimiser settings changed: ema_max 0.9999 -> 0.99, lr inf -> 0.001, warmup 5 -> 2" not in logs
    assert "--resume: optimiser settings changed: ema_max 0.9999 -> 0.99, lr 0.002 -> 0.001, warmup 5 -> 2" in logs
    assert [g["lr"] for g in tr.opt.param_groups] == [1e-3]  # warmup over: the new base lr
    tr.run()
    assert all(torch.isfinite(v).all() for v in load_weights(out / "ckpt" / "step_00000006", "ema").values())


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main(["--preset", "tiny", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {blocker / 'run'} cannot be created: {blocker} is a file, not a folder; "
                   "choose another --out")
    assert blocker.read_text() == "keep me"


def test_a_ckpt_path_that_cannot_be_a_folder_fails_before_k_means(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt").write_text("not a folder")
    assert main(["--preset", "tiny", "--out", str(out)]) == 2  # default self-labels: k-means never starts
    assert capsys.readouterr().err.strip() == (f"error: --out's ckpt/ folder {out / 'ckpt'} is a file, not a "
                                               "folder: choose another --out")
    assert not (out / "annotations.safetensors").exists() and (out / "ckpt").read_text() == "not a folder"


def test_annotate_checks_its_outputs_before_extracting(tmp_path, capsys):
    from sgengine.annotate.__main__ import main as annotate

    (tmp_path / "f").write_text("x")
    assert annotate(["--data", "digits", "--k", "4", "--out", str(tmp_path / "f" / "a.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {tmp_path / 'f' / 'a.safetensors'} cannot be created: "
                                               f"{tmp_path / 'f'} is a file, not a folder; choose another path")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_resume_takes_the_new_lr(tmp_path):
    out = tmp_path / "z2"
    Trainer(_cfg(out, steps=2, deepspeed=True, zero_stage=2), log=lambda *a: None).run()
    logs = []
    tr = Trainer(_cfg(out, steps=3, deepspeed=True, zero_stage=2, lr=5e-4, resume=True), log=logs.append)
    assert "--resume: optimiser settings changed: lr 0.002 -> 0.0005" in logs
    assert [g["lr"] for g in tr.engine.optimizer.param_groups] == pytest.approx([5e-4 * 3 / 5])  # warmup 5: step 2
    tr.run()
    assert tr.sched.get_last_lr() == pytest.approx([5e-4 * 4 / 5])


def test_eval_checks_its_out_before_any_feature(tmp_path, capsys):
    from sgengine.eval.__main__ import main as evaluate

    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "report.json"
    assert evaluate(["--samples", str(tmp_path / "none.npz"), "--ref", str(tmp_path / "none.npz"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {out} cannot be created: {tmp_path / 'f'} is a file, "
                                               "not a folder; choose another --out")
    assert evaluate(["train-classifier", "--data", "digits", "--out", str(tmp_path / "f" / "c.pt")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_checkpoints_from_before_checksums_still_load(two_steps, tmp_path):
    out = _copy(two_steps, tmp_path)
    ckpt = out / "ckpt" / "step_00000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert damage(ckpt) is None and resolve_checkpoint(out) == ckpt
    (ckpt / "state.pt").unlink()
    assert damage(ckpt) == "state.pt is missing" and latest_checkpoint(out).name == "step_00000002"
