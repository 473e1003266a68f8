"""Fault table (issue 20): every CLI given a bad flag, a conflict, a missing or damaged file or an
output it cannot write answers with exactly one ``error:`` line and exit 2, writes nothing under its
--out, and is refused before k-means (k-means is patched to fail the test if it runs). Then every
reader (folder, npz, npy, pack, tar) given truncated, empty, non-image, NaN and 16-bit input, and the
annotate CLI on the features of a DDPM and of a flow run (a README example that crashed).

The CLIs run in-process (``main(argv)``): a process per row would cost 2-5 s each on 2 cores."""
import dataclasses
import importlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sgengine.annotate.labels as labels_module
from sgengine.annotate.io import load_annotations
from sgengine.config import preset
from sgengine.data import load_data
from sgengine.data.pack import pack
from sgengine.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops

MAINS = {"train": "sgengine.train", "sample": "sgengine.sample", "annotate": "sgengine.annotate.__main__",
         "eval": "sgengine.eval.__main__", "data": "sgengine.data.__main__", "experiment": "sgengine.experiment"}


def run_cli(cli: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of ``python -m <cli> argv``, in this process."""
    capsys.readouterr()
    try:
        rc = importlib.import_module(MAINS[cli]).main(argv)
    except SystemExit as stop:
        rc = stop.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _png_bytes(rng, bits: int = 8) -> bytes:
    arr = rng.integers(0, 2 ** bits - 1, (8, 8)).astype(np.uint16 if bits == 16 else np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _run(root: Path, objective: str) -> Path:
    """A two-step tiny run on the digits' labels (10 conditions), checkpointed at its end."""
    cfg = dataclasses.replace(preset("tiny"), out=str(root / objective), objective=objective, condition="labels",
                              steps=2, ckpt_every=0, sample_steps=1, grid_rows=2, grid_cols=1)
    Trainer(cfg, log=lambda *a: None).run()
    return root / objective


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {objective: _run(root, objective) for objective in ("ddpm", "flow")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Damaged and misplaced inputs, one of each kind."""
    root, rng = tmp_path_factory.mktemp("files"), np.random.default_rng(0)
    f = {"root": root, "trunc_npz": root / "trunc.npz", "npy": root / "x.npy", "a_file": root / "a-file",
         "bad_json": root / "bad.json", "text_png": root / "text.png", "folder": root / "folder",
         "wrong_key": root / "wrong-key.npz"}
    np.savez(root / "good.npz", x=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8))
    data = (root / "good.npz").read_bytes()
    f["trunc_npz"].write_bytes(data[: len(data) // 2])
    np.save(f["npy"], np.zeros((4, 8, 8), np.uint8))
    f["a_file"].write_text("keep me")
    f["bad_json"].write_text("{not json")
    f["text_png"].write_text("not an image")
    f["folder"].mkdir()
    np.savez(f["wrong_key"], foo=np.zeros((2, 8, 8), np.uint8))
    return f


@pytest.fixture
def no_kmeans(monkeypatch):
    """Any k-means fails the test: every refusal must come before it."""
    def ran(*a, **k):
        raise AssertionError("k-means ran before the refusal")
    for name in ("self_label", "label_annotations", "pixel_self_labels"):
        monkeypatch.setattr(labels_module, name, ran)


CUDA = torch.cuda.is_available()
T = ["--preset", "tiny", "--out", "{out}"]
# (cli, argv, text the one error line holds); {out}: a fresh folder that must stay empty, {run}: a DDPM run,
# {f:NAME}: a file of the `files` fixture.
ROWS = [
    ("train", T + ["--beta_start", "0.5", "--beta_end", "0.1"], "--beta_start must be below --beta_end"),
    pytest.param("train", T + ["--device", "cuda"], "--device 'cuda' needs a CUDA GPU",
                 marks=pytest.mark.skipif(CUDA, reason="a GPU is present")),
    ("train", T + ["--device", "gpu"], "--device 'gpu' is not a device"),
    ("train", T + ["--model.channels", "0"], "--model.channels must be >= 1"),
    ("train", T + ["--model.heads", "3"], "--model.heads must divide every attention width"),
    ("train", T + ["--model.dropout", "2"], "--model.dropout must be in [0, 1)"),
    ("train", T + ["--model.channel_mult", "1,0"], "--model.channel_mult must be >= 1"),
    ("train", T + ["--deepspeed", "true", "--ds_config", "nope.json"], "--ds_config nope.json is not a file"),
    ("train", T + ["--deepspeed", "true", "--ds_config", "{f:bad_json}"], "is not valid JSON"),
    ("train", T + ["--online.enabled", "true"], "--online.enabled trains a U-ViT with flow matching"),
    ("train", T + ["--arch", "uvit"], "pass --uvit.in_channels 1"),
    ("train", T + ["--eval_every", "5"], "--eval_every needs a reference"),
    ("train", T + ["--eval_every", "5", "--eval_ref", "nope"], "--eval_ref nope does not exist"),
    ("train", T + ["--lr", "inf"], "--lr must be finite"),
    ("train", T + ["--lr", "nan"], "--lr must be > 0"),
    ("train", T + ["--lr", "-1e-3"], "--lr must be > 0"),
    ("train", T + ["--zero_stage", "2"], "--zero_stage applies only under DeepSpeed"),
    ("train", T + ["--ds_config", "x.json"], "--ds_config applies only under DeepSpeed"),
    ("train", T + ["--annotations", "nope.safetensors"], "--annotations is read only with --condition annotations"),
    ("train", T + ["--condition", "annotations", "--annotations", "nope.safetensors"],
     "nope.safetensors is not a file"),
    ("train", T + ["--steps", "0"], "--steps must be >= 1"),
    ("train", T + ["--batch_size", "-1"], "--batch_size must be >= 1"),
    ("train", T + ["--k", "0"], "--k must be >= 1"),
    ("train", T + ["--steps", "many"], "--steps expects an integer"),
    ("train", T + ["--model.nope", "3"], "unknown flag --model.nope"),
    ("train", T + ["--stpes", "3"], "unknown flag --stpes"),
    ("train", T + ["--config", "missing.json"], "--config cannot read missing.json"),
    ("train", T + ["--data", "nope_dir"], "--data nope_dir does not exist"),
    ("train", T + ["--data", "{f:trunc_npz}"], "a truncated or partial copy"),
    ("train", T + ["--data", "{f:wrong_key}"], "put the images under 'x' or 'images'"),
    ("train", ["--preset", "tiny", "--out", "{f:a_file}/run"], "is a file, not a folder"),
    ("sample", ["--ckpt", "{run}", "--like", "nope.png", "--out", "{out}/s.png"], "--like nope.png does not exist"),
    ("sample", ["--ckpt", "{run}", "--like", "{f:folder}", "--out", "{out}/s.png"], "is a folder, not an image"),
    ("sample", ["--ckpt", "{run}", "--like", "{f:text_png}", "--out", "{out}/s.png"], "is not a readable image"),
    ("sample", ["--ckpt", "{run}", "--n", "3", "--clusters", "0", "1", "2", "3", "--out", "{out}/s.png"],
     "--n 3 is fewer than the 4 --clusters"),
    ("sample", ["--ckpt", "{run}", "--clusters", "99", "--out", "{out}/s.png"], "--clusters 99 is not a cluster"),
    ("sample", ["--ckpt", "{run}", "--n", "0", "--out", "{out}/s.png"], "--n must be >= 1"),
    ("sample", ["--ckpt", "{run}", "--device", "gpu", "--out", "{out}/s.png"], "--device 'gpu' is not a device"),
    ("sample", ["--ckpt", "{run}", "--out", "{out}/s.jpg"], "must end in .png"),
    ("sample", ["--ckpt", "{run}", "--sag_layer", "mid", "--out", "{out}/s.png"], "has no effect without --sag_scale"),
    ("sample", ["--ckpt", "{out}/nope", "--out", "{out}/s.png"], "nope"),
    ("annotate", ["--data", "digits", "--k", "0", "--out", "{out}/a.safetensors"], "--k must be >= 1"),
    ("annotate", ["--data", "digits", "--k", "4", "--device", "gpu", "--out", "{out}/a.safetensors"], "--device 'gpu'"),
    ("annotate", ["--data", "nope_dir", "--k", "4", "--out", "{out}/a.safetensors"], "--data nope_dir: nope_dir does"),
    ("annotate", ["--data", "digits", "--feature_data", "nope", "--k", "4", "--out", "{out}/a.safetensors"],
     "--feature_data nope: nope does not exist"),
    ("annotate", ["--data", "{f:trunc_npz}", "--k", "4", "--out", "{out}/a.safetensors"],
     "a truncated or partial copy"),
    ("annotate", ["--data", "{f:wrong_key}", "--k", "1", "--out", "{out}/a.safetensors"], "put the images under 'x'"),
    ("annotate", ["--data", "digits", "--k", "4", "--out", "{f:a_file}/a.safetensors"], "is a file, not a folder"),
    ("annotate", ["--data", "digits", "--size", "8", "--k", "4", "--crf", "--out", "{out}/a.safetensors"],
     "--crf refines segment masks"),
    ("annotate", ["--data", "digits", "--size", "8", "--k", "4", "--extractor", "diffusion:{run}", "--t", "5000",
                  "--out", "{out}/a.safetensors"], "does not fit objective 'ddpm'"),
    ("annotate", ["--data", "digits", "--size", "8", "--k", "4", "--extractor", "diffusion:{out}/none",
                  "--out", "{out}/a.safetensors"], "does not exist; pass a run folder"),
    ("eval", ["--samples", "{f:npy}", "--ref", "{f:trunc_npz}", "--features", "{clf}", "--out", "{out}/r.json"],
     "a truncated or partial copy"),
    ("eval", ["--samples", "{f:trunc_npz}", "--ref", "{f:npy}", "--features", "{clf}", "--out", "{out}/r.json"],
     "a truncated or partial copy"),
    ("eval", ["--samples", "{f:npy}", "--ref", "nope", "--features", "{clf}", "--out", "{out}/r.json"],
     "--ref nope does not exist"),
    ("eval", ["--samples", "{f:npy}", "--ref", "{f:npy}", "--features", "bogus", "--out", "{out}/r.json"],
     "unknown feature network 'bogus'"),
    ("eval", ["--samples", "{f:npy}", "--ref", "{f:npy}", "--batch_size", "0"], "--batch_size must be >= 1"),
    ("eval", ["--samples", "{f:npy}", "--ref", "{f:npy}", "--device", "gpu"], "--device 'gpu'"),
    ("eval", ["--samples", "{f:npy}", "--ref", "{f:npy}", "--out", "{f:a_file}/r.json"], "is a file, not a folder"),
    ("data", ["pack", "{f:trunc_npz}", "{out}/p", "--size", "8"], "a truncated or partial copy"),
    ("data", ["pack", "{f:npy}", "{out}/p", "--size", "8"], "is not a pack source"),
    ("data", ["pack", "nope_dir", "{out}/p", "--size", "8"], "pack source nope_dir does not exist"),
    ("data", ["pack", "{f:folder}", "{out}/p", "--size", "0"], "--size must be >= 1"),
    ("data", ["pack", "{f:folder}", "{out}/p", "--size", "8"], "holds no images"),
    ("data", ["pack", "{f:root}", "{f:a_file}/p", "--size", "8"], "is a file, not a folder"),
    ("data", ["encode", "{f:folder}", "{out}/l", "--vae", "v", "--device", "gpu"], "--device 'gpu'"),
    ("experiment", ["compare", "--out", "{out}", "--device", "gpu"], "--device 'gpu'"),
    ("experiment", ["compare", "--out", "{out}", "--preset", "nope"], "--preset must be one of"),
    ("experiment", ["compare", "--out", "{out}", "--budget_steps", "0"], "--budget_steps must be >= 1"),
    ("experiment", ["compare", "--out", "{out}", "--methods", "foo"], "--methods is refused: unknown method 'foo'"),
    ("experiment", ["compare", "--out", "{f:a_file}/c"], "is a file, not a folder"),
    ("experiment", ["compare", "--out", "{out}", "--data", "nope_dir"], "--data nope_dir does not exist"),
]


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> str:
    """A one-step substitute classifier (grey 8x8 digits): a feature network for the eval rows."""
    from sgengine.eval.classifier import train_classifier

    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    return "classifier:" + str(train_classifier("digits", 8, 1, out, channels=1, width=4, max_iters=1, progress=False))


def _fill(arg: str, out: Path, run: Path, files: dict, clf: str) -> str:
    for name, path in files.items():
        arg = arg.replace(f"{{f:{name}}}", str(path))
    return arg.replace("{out}", str(out)).replace("{run}", str(run)).replace("{clf}", clf)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cli,argv,expect", ROWS)
def test_one_error_line_exit_2_nothing_written_no_kmeans(cli, argv, expect, runs, files, clf, tmp_path, capsys,
                                                         no_kmeans):
    out = tmp_path / "out"
    kept = {p: p.read_bytes() for p in files["root"].iterdir() if p.is_file()}
    rc, err = run_cli(cli, [_fill(a, out, runs["ddpm"], files, clf) for a in argv], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expect in err[0], err[0]
    assert "Errno" not in err[0] and "Traceback" not in err[0] and not err[0].startswith("error: '"), err[0]
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert {p: p.read_bytes() for p in files["root"].iterdir() if p.is_file()} == kept  # inputs untouched


@pytest.mark.parametrize("name", ["loss.png", "samples.png", "metrics.jsonl"])
def test_an_output_file_that_is_a_folder_is_caught_at_start_up(name, tmp_path, capsys, no_kmeans):
    (tmp_path / "run" / name).mkdir(parents=True)
    rc, err = run_cli("train", ["--preset", "tiny", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and err == [f"error: --out's file {tmp_path / 'run' / name} is a folder, not a file: choose "
                               "another --out, or move that folder away"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [name]


def test_pack_into_a_read_only_out_is_one_line(files, tmp_path, capsys, monkeypatch):
    import sgengine.common.paths as paths

    def read_only(*a, **k):  # what a read-only OUT does to a non-root user (root ignores the mode bits)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(paths.tempfile, "TemporaryFile", read_only)
    src, out = files["root"] / "good.npz", tmp_path / "ro" / "p"
    rc, err = run_cli("data", ["pack", str(src), str(out), "--size", "8"], capsys)
    assert rc == 2 and err == [f"error: OUT {tmp_path / 'ro' / 'p'} is not writable (Permission denied in "
                               f"{tmp_path}): choose another OUT"]


def test_dinov2_without_timm_names_the_install(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    rc, err = run_cli("eval", ["--samples", str(files["npy"]), "--ref", str(files["npy"]), "--features", "dinov2:F"],
                      capsys)
    assert rc == 2 and len(err) == 1 and "need timm: pip install timm" in err[0], err


def test_eval_reports_skipped_reference_files(clf, tmp_path, capsys):
    """Unreadable reference images are skipped, as training skips them, and reported: a note on
    stderr and ``skipped`` in the JSON, also when the cached statistics are used."""
    rng, ref = np.random.default_rng(1), tmp_path / "ref"
    ref.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(ref / f"{i}.jpg")
    for i in (2, 5):
        data = (ref / f"{i}.jpg").read_bytes()
        (ref / f"{i}.jpg").write_bytes(data[: len(data) // 3])
    np.save(tmp_path / "s.npy", rng.integers(0, 255, (6, 8, 8), dtype=np.uint8))
    for _ in range(2):  # computed, then read from the cache
        rc, err = run_cli("eval", ["--samples", str(tmp_path / "s.npy"), "--ref", str(ref), "--features", clf,
                                   "--out", str(tmp_path / "r.json"), "--device", "cpu"], capsys)
        assert rc == 0
        notes = [line for line in err if line.startswith("note: --ref")]
        assert len(notes) == 1 and "skipped 2 unreadable file(s)" in notes[0] and "2.jpg" in notes[0], err
        report = json.loads((tmp_path / "r.json").read_text())
        assert sorted(Path(f).name for f, _ in report["skipped"]["ref"]) == ["2.jpg", "5.jpg"]
        assert report["skipped"]["samples"] == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("objective,extra", [("ddpm", []), ("flow", ["--t", "0.8"])])
def test_annotate_on_diffusion_features(runs, objective, extra, tmp_path, capsys):
    """The README example: self-labels from a trained run's mid-block features (it crashed on an int size)."""
    out = tmp_path / "a.safetensors"
    rc, err = run_cli("annotate", ["--data", "digits", "--size", "8", "--k", "4", "--extractor",
                                   f"diffusion:{runs[objective]}", "--layer", "mid", *extra, "--out", str(out),
                                   "--quiet", "--cache", "none"], capsys)
    assert rc == 0, err
    ann = load_annotations(out)
    assert ann.k == 4 and len(ann) == 1797 and len(set(ann.ids.tolist())) > 1
    assert ann.settings["features"]["extractor"] == "diffusion"
    assert ann.settings["features"]["t"] == (0.8 if objective == "flow" else 200)


# ------------------------------------------------------------------------------ readers

def _readers_input(kind: str, fault: str, root: Path) -> Path:
    """One input per (reader, fault); 16-bit inputs are valid (scaled by 255/65535, checks.py)."""
    rng = np.random.default_rng(0)
    if kind == "folder":
        root.mkdir()
        for i in range(3):
            body = {"truncated": _png_bytes(rng)[:40], "empty": None, "non-image": b"hello",
                    "16-bit": _png_bytes(rng, 16)}[fault]
            if body is not None:
                (root / f"{i}.png").write_bytes(body)
        return root
    if kind == "tar":
        members = {"truncated": [(f"{i}.png", _png_bytes(rng)) for i in range(3)], "empty": [],
                   "non-image": [(f"{i}.txt", b"hi") for i in range(3)],
                   "16-bit": [(f"{i}.png", _png_bytes(rng, 16)) for i in range(3)]}[fault]
        path = _tar(root.with_suffix(".tar"), members)
        if fault == "truncated":  # inside the second member's header: tarfile alone reads a 1-image shard
            path.write_bytes(path.read_bytes()[:1200])
        return path
    arr = {"truncated": rng.integers(0, 255, (4, 8, 8), dtype=np.uint8), "empty": np.zeros((0, 8, 8), np.uint8),
           "non-image": np.array(["a", "b"]), "NaN": np.full((4, 8, 8), np.nan, np.float32),
           "16-bit": rng.integers(0, 65535, (4, 8, 8)).astype(np.uint16)}[fault]
    path = root.with_suffix(".npz" if kind in ("npz", "pack") else ".npy")
    np.savez(path, x=arr) if path.suffix == ".npz" else np.save(path, arr)
    if kind == "pack" and fault in ("truncated", "16-bit"):
        pack(path, root, 8, 1, 0, log=lambda *a: None, progress=False)
        if fault == "truncated":
            (root / "data.bin").write_bytes((root / "data.bin").read_bytes()[:10])
        return root
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


READER_ROWS = [  # (reader, fault, the error's text; None: read correctly)
    ("folder", "truncated", "could be read"), ("folder", "empty", "no images"),
    ("folder", "non-image", "UnidentifiedImageError"), ("folder", "16-bit", None),
    ("npz", "truncated", "a truncated or partial copy"), ("npz", "empty", "holds no images"),
    ("npz", "non-image", "image array must be"), ("npz", "NaN", "holds 256 NaN/Inf value(s)"), ("npz", "16-bit", None),
    ("npy", "truncated", "a truncated or partial copy"), ("npy", "empty", "holds no images"),
    ("npy", "non-image", "image array must be"), ("npy", "NaN", "holds 256 NaN/Inf value(s)"), ("npy", "16-bit", None),
    ("pack", "truncated", "has 10 bytes but the manifest says"), ("pack", "16-bit", None),
    ("tar", "truncated", "is truncated"), ("tar", "empty", "holds no images"), ("tar", "non-image", "holds no images"),
    ("tar", "16-bit", None),
]


@pytest.mark.parametrize("kind,fault,expect", READER_ROWS)
def test_readers(kind, fault, expect, tmp_path, capsys):
    """Each through its CLI: ``data pack`` for tar shards (they train once packed), the train CLI's
    reader (``load_data``) for the others; 16-bit images come out as uint8 scaled by 255/65535."""
    src = _readers_input(kind, fault, tmp_path / "src")
    if kind == "tar":
        rc, err = run_cli("data", ["pack", str(src), str(tmp_path / "p"), "--size", "8", "--channels", "1",
                                   "--workers", "0", "--quiet"], capsys)
        data = load_data(str(tmp_path / "p"), 8, 1, progress=False) if rc == 0 else None
    else:
        try:
            data, rc, err = load_data(str(src), 8, 1, progress=False), 0, []
        except (ValueError, OSError, KeyError) as exc:
            from sgengine.common.flags import error_line
            data, rc, err = None, 2, [error_line(exc)]
    if expect is None:
        assert rc == 0 and data.images.dtype == torch.uint8 and len(data) >= 3, err
        assert 128 < int(data.images.max()) <= 255 and not data.skipped  # scaled, not clipped to 255 nor to 0
    else:
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
