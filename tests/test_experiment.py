"""periodic_eval's best checkpoint, and the equal-budget comparison harness end to end (tiny, digits)."""
import json

import numpy as np
import pytest
from PIL import Image

from sgengine.config import apply_overrides, preset
from sgengine.data import load_digits
from sgengine.eval import runner
from sgengine.eval.classifier import train_classifier
from sgengine.experiment import CompareConfig, compare, parse_args, parse_method, plot_lines
from sgengine.sampling import load_generator
from sgengine.checkpoint import load_meta
from sgengine.training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops


def tiny_trainer(tmp_path, **over):
    cfg = apply_overrides(preset("tiny"), {"out": str(tmp_path / "run"), "device": "cpu", "keep_checkpoints": 1,
                                           "condition": "labels", **over})
    return Trainer(cfg, log=lambda *a: None)


class FakeExtractor:
    name = "fake"


def test_periodic_eval_keeps_the_lowest_distance(tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 1.0, 1.5])
    monkeypatch.setattr(runner, "_context", lambda trainer: (FakeExtractor(), None))
    monkeypatch.setattr(runner, "evaluate_generator", lambda *a, **k: {
        "metric": "FD_classifier", "feature_network": "fake", "extractor": "fake", "frechet_distance": next(scripted)})
    trainer, best_steps = tiny_trainer(tmp_path), []
    for _ in range(5):
        trainer.train_step()
        trainer.checkpoint()  # the trainer's own checkpoints go on, and prune old ones (keep 1)
        report = runner.periodic_eval(trainer)
        best_steps.append(runner.read_best(trainer.out, "fake")["step"])
        assert report["best"] == (best_steps[-1] == trainer.step)
    assert best_steps == [1, 2, 2, 4, 4]
    best = trainer.out / "ckpt" / "best"
    assert load_meta(best)["step"] == 4  # step 4 was pruned from ckpt/, its linked copy survives
    assert not (trainer.out / "ckpt" / "step_00000004").exists()
    assert load_generator(best).k == 10
    assert json.loads((trainer.out / "ckpt" / "best.json").read_text())["frechet_distance"] == 1.0
    assert len((trainer.out / "eval.jsonl").read_text().splitlines()) == 5
    assert runner.read_best(trainer.out, "another-network") is None  # never compared across networks


def test_periodic_eval_for_real_on_a_classifier(tmp_path):
    digits = load_digits(8)
    np.savez(tmp_path / "ref.npz", x=digits.images.numpy()[:300])
    clf = train_classifier(digits, 8, 1, tmp_path / "clf.pt", channels=1, width=8, max_iters=5, progress=False)
    trainer = tiny_trainer(tmp_path, eval_ref=str(tmp_path / "ref.npz"), eval_features=str(clf), eval_n=20)
    trainer.train_step()
    report = runner.periodic_eval(trainer)
    assert report["best"] and report["metric"] == "FD_classifier" and report["n"] == 20
    assert np.isfinite(report["frechet_distance"]) and 0 <= report["precision"] <= 1
    assert (trainer.out / "ckpt" / "best" / "ema.safetensors").is_file()


def test_periodic_eval_needs_a_reference(tmp_path):
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="--eval_ref"):
        runner.periodic_eval(trainer)


def test_methods_are_checked_before_any_training():
    assert parse_method("self-labeled").features == "pixels"
    assert parse_method("self-labeled:pca").condition == "self-labels"
    assert parse_method("self-labeled:diffusion").condition == "annotations"
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(methods=("none", "gt"))


def test_command_line_builds_the_config():
    cc = parse_args(["compare", "--methods", "none, labels", "--budget_steps", "5", "--w", "1.5"])
    assert cc.methods == ("none", "labels") and cc.budget_steps == 5 and cc.w == 1.5


def test_diffusion_labels_need_the_unconditional_run():
    with pytest.raises(ValueError, match="put 'none' in --methods"):
        CompareConfig(methods=("labels", "self-labeled:diffusion"))


def test_compare_end_to_end(tmp_path):
    cc = CompareConfig(data="digits", preset="tiny", methods=("labels", "self-labeled:pca", "none",
                                                                  "self-labeled:diffusion"),
                       budget_steps=4, eval_every=2, eval_n=30, clf_max_iters=10, clf_epochs=1, out=str(tmp_path))
    summary = compare(cc, log=lambda *a: None)
    assert list(summary["methods"]) == ["none", "labels", "self-labeled:pca", "self-labeled:diffusion"]
    assert summary["metric"] == "FD_classifier" and "not Inception" in summary["feature_network"]
    for r in summary["methods"].values():
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert all(np.isfinite(p["frechet_distance"]) and p["frechet_distance"] > 0 for p in r["curve"])
    assert summary["methods"]["labels"]["labels"]["nmi"] == pytest.approx(1.0)
    assert summary["methods"]["none"]["k"] == 0 and summary["methods"]["self-labeled:pca"]["k"] == 10
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"].keys() == summary["methods"].keys()
    table = (tmp_path / "results.md").read_text().splitlines()
    assert sum(line.startswith("| self-labeled:") for line in table) == 2
    with Image.open(tmp_path / "distance.png") as im:
        assert im.size == (720, 420)
    with pytest.raises(FileExistsError, match="choose another --out"):
        compare(cc, log=lambda *a: None)  # a second comparison never trains over the first


def test_plot_lines_draws_each_series_in_its_colour(tmp_path):
    path = plot_lines({"a": ([0, 10], [1.0, 2.0]), "b": ([0, 10], [2.0, 1.0])}, tmp_path / "p.png", "t")
    pixels = set(map(tuple, np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).tolist()))
    assert (31, 119, 180) in pixels and (255, 127, 14) in pixels
