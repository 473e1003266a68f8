"""Faults of a running training (issue 20): Ctrl-C at chosen moments, a full disk, a second run on
one --out. Each asserts the one line the user sees, the exit code, and what is left on disk: a
Ctrl-C resumes bit for bit, a full disk keeps the last intact step, a run lock names its holder.

The moments are made exact by sending the signal from inside a patched function of the run itself
(os.kill of this very process: Python runs the handler right after, in the main thread)."""
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sgtest import torchrun

from sgengine import checkpoint
from sgengine.checkpoint import damage, latest_checkpoint
from sgengine.common import io as sgio
from sgengine.common.runlock import LOCK_FILE
from sgengine.models.unet import UNet
from sgengine.train import main
from sgengine.training.engines import PlainEngine
from sgengine.training.logger import MetricsLogger
from sgengine.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops

STEPS = 6
FLAGS = ["--preset", "tiny", "--condition", "labels", "--steps", str(STEPS), "--ckpt_every", "2", "--log_every", "1",
         "--sample_steps", "2", "--grid_rows", "2", "--grid_cols", "1"]


def _train(out, *extra) -> int:
    return main([*FLAGS, "--out", str(out), *extra])


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: weights, EMA, optimizer state and random states."""
    found = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    found.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    for pt in sorted(ckpt.rglob("*.pt")):
        _flatten(torch.load(pt, map_location="cpu", weights_only=False), str(pt.relative_to(ckpt)), found)
    return found


def _flatten(obj, name: str, found: dict) -> None:
    if isinstance(obj, torch.Tensor):
        found[name] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{name}.{k}", found)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{name}.{i}", found)


def _assert_same_tensors(got: Path, want: Path) -> None:
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b) and len(a) > 100
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _messages(err: str) -> list[str]:
    """stderr without the progress bar (tqdm redraws its line with carriage returns)."""
    lines = (seg.split("\r")[-1].strip() for seg in err.split("\n"))
    return [line for line in lines if line and not line.startswith("train:")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _train(out) == 0
    return out / "ckpt" / f"step_{STEPS:08d}"


# -- Ctrl-C --------------------------------------------------------------------------------------
def _interrupt_on(monkeypatch, owner, name: str, nth: int, after: bool = False, times: int = 1):
    """Send SIGINT to this process inside the ``nth`` call of ``owner.name`` (before or after the
    real work), and again inside each of the next ``times - 1`` calls."""
    real, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        hit = nth <= len(calls) < nth + times
        if hit and not after:
            os.kill(os.getpid(), signal.SIGINT)
        result = real(*args, **kwargs)
        if hit and after:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, patched)


# (moment, patched owner and function, its call that gets the signal, after the call, the step the run stops at)
MOMENTS = [
    ("in the batch draw of step 3", Trainer, "_draw", 3, True, 3),
    ("inside the forward of step 3", UNet, "forward", 3, False, 3),
    ("inside the backward of step 3", PlainEngine, "backward", 3, True, 3),
    ("after the optimizer step of step 3, before it is counted", PlainEngine, "step", 3, True, 3),
    ("inside the checkpoint write of step 2", checkpoint, "save_file", 2, False, 2),
    ("inside the metrics write of step 3", MetricsLogger, "log", 3, False, 3),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment,owner,name,nth,after,stop", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_ctrl_c_saves_the_last_step_and_resumes_bit_identically(tmp_path, monkeypatch, capsys, straight,
                                                              moment, owner, name, nth, after, stop):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_on(patch, owner, name, nth, after)
        assert _train(out) == 130
    saved = out / "ckpt" / f"step_{stop:08d}"
    cmd = f"python -m sgengine.train {' '.join(FLAGS)} --out {out} --resume"
    assert _messages(capsys.readouterr().err) == [f"interrupted: stopped after step {stop}, saved {saved}; "
                                                  f"resume with: {cmd}"]
    assert latest_checkpoint(out) == saved and torch.load(saved / "state.pt", weights_only=False)["step"] == stop
    assert not (out / LOCK_FILE).exists()
    assert _train(out, "--resume") == 0
    _assert_same_tensors(out / "ckpt" / f"step_{STEPS:08d}", straight)


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_inside_the_interrupt_checkpoint_stops_at_once(tmp_path, monkeypatch, capsys, straight):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_on(patch, UNet, "forward", 3)  # the first: stop after step 3
        _interrupt_on(patch, checkpoint, "save_file", 3)  # the second, inside step 3's checkpoint (step 2's: calls 1-2)
        assert _train(out) == 130
    last = out / "ckpt" / "step_00000002"
    assert _messages(capsys.readouterr().err) == [
        f"interrupted: stopped at once after step 3, without its checkpoint; the last checkpoint is {last}; resume with: "
        f"python -m sgengine.train {' '.join(FLAGS)} --out {out} --resume"]
    assert latest_checkpoint(out) == last and not list((out / "ckpt").glob(".step_*"))  # no half folder left
    assert _train(out, "--resume") == 0
    _assert_same_tensors(out / "ckpt" / f"step_{STEPS:08d}", straight)


@pytest.mark.timeout(60)
def test_ctrl_c_before_the_first_step_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_on(monkeypatch, Trainer, "_build", 1)
    assert main(["--preset", "tiny", "--out", str(out), "--steps", "2"]) == 130  # after k-means, in set-up
    assert _messages(capsys.readouterr().err) == [
        f"interrupted: stopped before training started; nothing to resume in {out}; start again with: "
        f"python -m sgengine.train --preset tiny --out {out} --steps 2"]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero2_two_ranks_stop_together_when_one_rank_gets_ctrl_c(tmp_path):
    """SIGINT to rank 1 alone, inside the forward of step 2: both ranks stop after step 3 (the flag is
    agreed over ranks a step later), write that step's checkpoint together (no periodic one falls
    there) and resume bit for bit."""
    torchrun("dist_interrupt.py", tmp_path, *FLAGS, "--batch_size", "8", "--deepspeed", "true", "--zero_stage", "2",
             timeout=280)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["codes"] for r in ranks] == [[0, 130, 0]] * 2
    saved = tmp_path / "stopped" / "ckpt" / "step_00000003"  # flag set in step 2, agreed at the next boundary
    assert ranks[0]["lines"] == [f"interrupted: stopped after step 3, saved {saved}; resume with: torchrun "
                                 f"--nproc_per_node=2 -m sgengine.train {' '.join(FLAGS)} --batch_size 8 --deepspeed "
                                 f"true --zero_stage 2 --out {tmp_path / 'stopped'} --resume"]
    assert ranks[1]["lines"] == []  # one line: rank 0's
    assert ranks[0]["saved"] == ["step_00000002/deepspeed", "step_00000003/deepspeed"]
    _assert_same_tensors(tmp_path / "stopped" / "ckpt" / f"step_{STEPS:08d}",
                         tmp_path / "straight" / "ckpt" / f"step_{STEPS:08d}")


# -- a full disk -----------------------------------------------------------------------------------
def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    """A file whose writes fail for want of space (after ``room`` bytes), as on a full disk."""

    def __init__(self, fh, room: int = 0):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.room = 0
            raise _enospc()
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _full_on(monkeypatch, module, nth: int, match: str = "") -> None:
    """``open`` inside ``module`` gives a file that cannot grow (from the ``nth`` opening of a file
    whose name holds ``match``), so the real writers (torch.save, the JSONL append) meet ENOSPC."""
    calls = []

    def fake_open(file, mode="r", *args, **kwargs):
        fh = open(file, mode, *args, **kwargs)
        if match in str(file) and ("w" in mode or "a" in mode):
            calls.append(1)
            if len(calls) >= nth:
                return _FullFile(fh, room=10)
        return fh

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def _fail_on(monkeypatch, owner, name: str, nth: int, error) -> None:
    real, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) >= nth:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def _safetensors_full():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _png_full(monkeypatch, name: str) -> None:
    from PIL import Image

    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if Path(str(fp)).name.startswith(name):
            raise _enospc()
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


# (the write, how it fails, the file named, the last intact step)
DISK_FULL = [
    ("the weights of the step 4 checkpoint (safetensors)",
     lambda mp: _fail_on(mp, checkpoint, "save_file", 3, _safetensors_full()), "ckpt/.step_00000004.tmp", 2),
    ("state.pt of the step 4 checkpoint (torch.save)", lambda mp: _full_on(mp, checkpoint, 2, "state.pt"),
     "ckpt/.step_00000004.tmp", 2),
    ("metrics.jsonl at step 3", lambda mp: _full_on(mp, sgio, 3, "metrics.jsonl"), "metrics.jsonl", 2),
    ("loss.png after the step 2 checkpoint", lambda mp: _png_full(mp, "loss.png"), "loss.png", 2),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("write,fill,named,last", DISK_FULL, ids=[d[0] for d in DISK_FULL])
def test_a_full_disk_is_one_line_and_keeps_the_last_intact_step(tmp_path, monkeypatch, capsys, straight,
                                                                write, fill, named, last):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        fill(patch)
        assert _train(out) == 2
    mount, device = sgio.mount_of(tmp_path)
    kept = out / "ckpt" / f"step_{last:08d}"
    [line] = _messages(capsys.readouterr().err)
    assert line.startswith(f"error: the disk is full: no space left for {out / named} on {mount} ({device}, ")
    assert line.endswith(f" MiB free); the last intact checkpoint is {kept}: free space there, then continue "
                         f"with: python -m sgengine.train {' '.join(FLAGS)} --out {out} --resume")
    assert latest_checkpoint(out) == kept and damage(kept) is None
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half file or folder left
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] >= last
    assert _train(out, "--resume") == 0
    _assert_same_tensors(out / "ckpt" / f"step_{STEPS:08d}", straight)


@pytest.mark.timeout(60)
def test_a_full_disk_while_writing_the_self_labels(tmp_path, monkeypatch, capsys):
    from sgengine.annotate import io as annotate_io

    out = tmp_path / "run"
    _fail_on(monkeypatch, annotate_io, "save_file", 1, _safetensors_full())
    assert main(["--preset", "tiny", "--out", str(out), "--steps", "2"]) == 2
    [line] = _messages(capsys.readouterr().err)
    assert line.startswith(f"error: the disk is full: no space left for {out / 'annotations.safetensors'} on ")
    assert "; no checkpoint was written yet: free space there, then continue with: " in line
    assert not list(out.glob("annotations*"))  # neither the file nor its temporary twin


def test_a_writer_that_loses_the_errno_is_judged_by_the_space_left(tmp_path, monkeypatch):
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(sgio, "free_bytes", lambda path: 0)
    assert sgio.is_disk_full(torch_words, tmp_path)
    assert not sgio.is_disk_full(ValueError("bad value"), tmp_path, check_space=False)
    monkeypatch.setattr(sgio, "free_bytes", lambda path: 10 * sgio.NEARLY_FULL)
    assert not sgio.is_disk_full(torch_words, tmp_path)
    try:  # what torch.save into a file object raises: the OSError stays in the chain
        try:
            raise _enospc()
        except OSError:
            raise torch_words  # noqa: B904 - implicit chaining, as torch does
    except RuntimeError as err:
        chained = err
    assert chained.__context__.errno == errno.ENOSPC and sgio.is_disk_full(chained, tmp_path)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.timeout(120)
def test_a_real_full_tmpfs_then_resume_once_there_is_space(tmp_path, capsys, straight):
    """A 5 MB tmpfs holds one 3.2 MB checkpoint but not two: the second fails inside torch's and
    safetensors' own writers; grown to 16 MB, --resume finishes the run bit for bit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "5m"):
        pytest.skip("cannot mount a tmpfs here (needs root and a mount namespace that allows it)")
    try:
        out = disk / "run"
        assert _train(out) == 2
        [line] = _messages(capsys.readouterr().err)
        assert line.startswith(f"error: the disk is full: no space left for {out / 'ckpt'}")
        assert f" on {disk} (tmpfs, " in line and f"the last intact checkpoint is {out / 'ckpt' / 'step_00000002'}" in line
        assert not list((out / "ckpt").glob(".step_*"))  # the partial folder is gone: its space is back
        assert subprocess.run(["mount", "-o", "remount,size=16m", str(disk)]).returncode == 0
        assert _train(out, "--resume") == 0
        _assert_same_tensors(out / "ckpt" / f"step_{STEPS:08d}", straight)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# -- the run lock ----------------------------------------------------------------------------------
def _wait_for(cond, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_second_run_and_a_live_resume_are_refused_then_ctrl_c_stops_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["--preset", "tiny", "--condition", "labels", "--out", str(out), "--steps", "100000",
             "--ckpt_every", "0", "--log_every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sgengine.train", *first], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lock = out / LOCK_FILE
        _wait_for(lambda: lock.is_file() and lock.read_text().startswith(f'{{"pid": {proc.pid},')
                  and lock.read_text().endswith("}\n"), "the first run's lock")
        holder = json.loads(lock.read_text())
        assert (holder["host"], holder["command"]) == (socket.gethostname(), "python -m sgengine.train " + " ".join(first))
        refusal = (f"error: --out {out} is in use by pid {proc.pid} on {holder['host']} (started {holder['started']}: "
                   f"{holder['command']}): wait for that run to end or stop it, or choose another --out")
        for extra in ([], ["--resume"]):  # default self-labels: refused before k-means
            assert main(["--preset", "tiny", "--out", str(out), *extra]) == 2
            assert _messages(capsys.readouterr().err) == [refusal]
        assert not (out / "annotations.safetensors").exists()
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2,
                  "two training steps")
        proc.send_signal(signal.SIGINT)  # kill -INT, as a terminal's Ctrl-C sends it
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    [line] = _messages(err)
    step = latest_checkpoint(out)
    assert line == (f"interrupted: stopped after step {int(step.name[5:])}, saved {step}; resume with: "
                    f"python -m sgengine.train {' '.join(first)} --resume")
    assert not lock.exists()


@pytest.mark.timeout(60)
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC", "command": "x"}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    assert main([*FLAGS, "--steps", "1", "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: took over the stale run lock {out / LOCK_FILE} of pid {dead.pid} on {stale['host']} "
                     "(started 2026-01-01 00:00:00 UTC: x), which is no longer running"]
    assert not (out / LOCK_FILE).exists()


def test_a_lock_written_on_another_host_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = {"pid": 1, "host": "elsewhere", "started": "2026-01-01 00:00:00 UTC", "command": "x"}
    (out / LOCK_FILE).write_text(json.dumps(other))
    assert main([*FLAGS, "--out", str(out)]) == 2
    lock = out / LOCK_FILE
    assert _messages(capsys.readouterr().err) == [
        f"error: {lock} names pid 1 on elsewhere (started 2026-01-01 00:00:00 UTC: x), a process that cannot be "
        f"checked from {socket.gethostname()}: if that run has ended, delete {lock} and start again"]
    assert json.loads(lock.read_text()) == other and [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_without_flock_the_written_holder_decides(tmp_path, monkeypatch):
    """File systems without flock (some network mounts): a live pid on this host still refuses."""
    from sgengine.common import runlock

    monkeypatch.setattr(runlock, "fcntl", None)
    out, host = tmp_path / "run", socket.gethostname()
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(runlock.RunLocked, match=f"--out {out} is in use by pid {os.getppid()} on {host} "):
        runlock.acquire(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": host}))
    notes = []
    runlock.acquire(out, notes.append)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() and "no longer running" in notes[0]
    runlock.release(out)
    assert not (out / LOCK_FILE).exists()


@pytest.mark.timeout(60)
def test_the_sample_cli_names_a_full_disk(straight, tmp_path, monkeypatch, capsys):
    from sgengine.sample import main as sample_main

    module = sys.modules["sgengine.sample"]  # the module object (the package attribute is the function)
    monkeypatch.setattr(module, "open", lambda file, mode="r": _FullFile(open(file, mode)), raising=False)
    out = tmp_path / "grid.png"
    assert sample_main(["--ckpt", str(straight), "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    mount, device = sgio.mount_of(tmp_path)
    [line] = [m for m in _messages(capsys.readouterr().err) if m.startswith("error:")]
    assert line.startswith(f"error: the disk is full: no space left for {out.with_suffix('.npz')} on {mount} ({device}, ")
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no half .npz


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["sgengine.sample", "sgengine.annotate", "sgengine.eval", "sgengine.data",
                                    "sgengine.experiment", "sgengine.training.bench"])
def test_ctrl_c_in_any_cli_is_one_line_and_exit_130(module, monkeypatch, capsys):
    """Every CLI ends a Ctrl-C in one line and exit 130, not a KeyboardInterrupt traceback."""
    import runpy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.setattr("argparse.ArgumentParser.parse_known_args", interrupted)
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: stopped by Ctrl-C before the command finished; run it again"]
