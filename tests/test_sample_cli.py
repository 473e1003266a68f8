"""`python -m sgengine.sample` validates every flag before it samples (issue 13 item 7): each bad
input is one `error:` line, exit code 2, and no file is written."""
import dataclasses
import json
import shutil

import pytest

from sgengine.config import preset
from sgengine.sample import main
from sgengine.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops


def _run(out, **kw):
    cfg = dataclasses.replace(preset("tiny"), out=str(out), steps=2, ckpt_every=2, sample_steps=2, grid_rows=2,
                              grid_cols=1, **kw)
    Trainer(cfg, log=lambda *a: None).run()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    return {"cond": _run(d / "cond", condition="labels"), "uncond": _run(d / "uncond", condition="none")}


def _error(capsys, *argv) -> str:
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err[len("error: "):]


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--n", "-3"], "--n must be >= 1, got -3"),
    (["--out", "{tmp}/grid"], "--out {tmp}/grid: the sample grid is written as a PNG image, so --out must end in "
                              ".png (allowed: .png), e.g. --out {tmp}/grid.png"),
    (["--sag_layer", "nope"], "--sag_layer has no effect without --sag_scale S (S > 0, e.g. 0.5): add --sag_scale, "
                              "or drop --sag_layer"),
    (["--sag_scale", "-1"], "--sag_scale must be >= 0 (0 = off), got -1.0"),
])
def test_flags_are_checked_before_the_checkpoint_is_read(runs, capsys, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _error(capsys, "--ckpt", runs["cond"], "--out", tmp_path / "s.png", *argv) == message.format(tmp=tmp_path)
    assert not list(tmp_path.iterdir())


def test_clusters_need_a_conditional_model_and_ids_in_range(runs, capsys, tmp_path):
    out = tmp_path / "s.png"
    msg = _error(capsys, "--ckpt", runs["uncond"], "--clusters", "1", "--out", out)
    assert msg == f"--clusters needs a conditional model, but {runs['uncond']} was trained unconditionally " \
                  "(--condition none): drop --clusters"
    msg = _error(capsys, "--ckpt", runs["cond"], "--clusters", "3", "10", "--out", out)
    assert msg == "--clusters 10 is not a cluster of this model: ids lie in [0, 10)"
    assert not out.exists()


def test_an_unknown_sag_layer_lists_the_available_ones(runs, capsys, tmp_path):
    msg = _error(capsys, "--ckpt", runs["cond"], "--sag_scale", "0.5", "--sag_layer", "nope", "--out", tmp_path / "s.png")
    assert msg.startswith("--sag_layer nope is not an attention layer of this model; available: ")
    assert len(msg.split("available: ")[1].split(", ")) >= 1 and not list(tmp_path.iterdir())


def test_an_unwritable_out_is_refused_before_sampling(runs, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    msg = _error(capsys, "--ckpt", runs["cond"], "--out", tmp_path / "f" / "s.png")
    assert msg == f"--out {tmp_path / 'f' / 's.png'} cannot be created: {tmp_path / 'f'} is a file, not a folder; " \
                  "choose another --out"


def test_weights_of_another_network_are_a_one_line_error(runs, capsys, tmp_path):
    run = shutil.copytree(runs["cond"], tmp_path / "run")
    meta_file = run / "ckpt" / "step_00000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["channels"] = 8  # the meta.json of a narrower model beside these weights
    meta_file.write_text(json.dumps(meta))
    msg = _error(capsys, "--ckpt", run, "--out", tmp_path / "s.png")
    assert msg.startswith(f"{meta_file.parent / 'ema'}.safetensors does not fit the network its meta.json describes (")
    assert "in the file but" in msg and "pass a checkpoint folder that sgengine.train wrote whole" in msg


def test_a_valid_request_samples(runs, capsys, tmp_path):
    out = tmp_path / "s.png"
    assert main(["--ckpt", str(runs["cond"]), "--n", "2", "--steps", "2", "--clusters", "3", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".npz").is_file()
