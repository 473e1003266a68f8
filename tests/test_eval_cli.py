"""`python -m sgengine.eval` and the substitute classifier feature network, on the digits (8x8)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.data import load_digits
from sgengine.eval.__main__ import main
from sgengine.eval.classifier import ClassifierFeatures, train_classifier
from sgengine.eval.features import INCEPTION_ENV, ClassifierExtractor
from sgengine.eval.frechet import save_stats
from sgengine.eval.runner import cache_paths, feature_network, reference


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A classifier trained for a few iterations: enough for distances to be meaningful, and fast."""
    out = tmp_path_factory.mktemp("clf") / "digits-clf.pt"
    return train_classifier(load_digits(8), 8, 1, out, channels=1, width=8, batch_size=32, max_iters=25,
                            progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Reference, an independent sample of the same distribution, and a brightened copy of it."""
    d, x = tmp_path_factory.mktemp("sets"), load_digits(8).images.numpy()
    np.savez(d / "ref.npz", x=x[:600])
    np.savez(d / "same.npz", x=x[600:1200])
    np.savez(d / "shifted.npz", x=np.clip(x[600:1200].astype(int) + 80, 0, 255).astype(np.uint8))
    return d


def run_cli(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_classifier_is_a_classifier_extractor(clf):
    ext = ClassifierFeatures(clf)
    assert isinstance(ext, ClassifierExtractor)
    f, p = ext.features_and_probs(torch.rand(5, 1, 8, 8) * 2 - 1)
    assert f.shape == (5, ext.dim) and p.shape == (5, 10)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5)
    rgb_up = load_digits(16).images[:4].repeat(1, 3, 1, 1)  # RGB and a different size are adapted
    assert ext(rgb_up).shape == (4, ext.dim)
    assert ext.description == "classifier:digits-clf penultimate features (not Inception)"


def test_train_classifier_is_cached_by_file(clf):
    before = clf.stat().st_mtime_ns
    assert train_classifier("no-such-data", 8, 1, clf) == clf  # existing file: no data is even loaded
    assert clf.stat().st_mtime_ns == before


def test_train_classifier_needs_labels(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="needs labels"):
        train_classifier(str(tmp_path / "x.npz"), 8, 1, tmp_path / "c.pt", channels=1)


def test_cli_distance_to_itself_is_zero_and_to_a_shifted_set_larger(clf, sets, capsys):
    feats = f"classifier:{clf}"
    self_ = run_cli(capsys, "--samples", str(sets / "ref.npz"), "--ref", str(sets / "ref.npz"), "--features", feats)
    same = run_cli(capsys, "--samples", str(sets / "same.npz"), "--ref", str(sets / "ref.npz"), "--features", feats,
                   "--out", str(sets / "report.json"))
    shifted = run_cli(capsys, "--samples", str(sets / "shifted.npz"), "--ref", str(sets / "ref.npz"),
                      "--features", feats)
    assert abs(self_["frechet_distance"]) < 1e-6
    assert shifted["frechet_distance"] > 3 * same["frechet_distance"] > 0
    assert shifted["precision"] < same["precision"] and shifted["recall"] < same["recall"]
    assert same["metric"] == "FD_classifier" and "not Inception" in same["feature_network"]
    assert {"inception_score", "inception_score_std", "n"} <= set(same)
    assert json.loads((sets / "report.json").read_text())["frechet_distance"] == same["frechet_distance"]


def test_reference_statistics_are_cached_and_reusable(clf, sets, capsys):
    ext = feature_network(f"classifier:{clf}")
    stats_file, feats_file = cache_paths(sets / "ref.npz", ext)
    reference(sets / "ref.npz", ext, progress=False)
    assert stats_file.is_file() and feats_file.is_file() and stats_file.parent == sets
    same, feats = str(sets / "same.npz"), f"classifier:{clf}"
    a = run_cli(capsys, "--samples", same, "--ref", str(sets / "ref.npz"), "--features", feats)
    b = run_cli(capsys, "--samples", same, "--ref", str(stats_file), "--features", feats)
    assert b["frechet_distance"] == pytest.approx(a["frechet_distance"], rel=1e-9)
    assert "precision" not in b  # a statistics file holds no features to measure precision/recall on


def test_statistics_of_another_network_are_refused(clf, tmp_path):
    save_stats(tmp_path / "s.npz", np.zeros(4), np.eye(4), extractor="inception-v3-tf")
    with pytest.raises(ValueError, match="not 'classifier:"):
        reference(tmp_path / "s.npz", feature_network(f"classifier:{clf}"))


def test_missing_inception_weights_say_how_to_fix(sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "absent.pt"))
    assert main(["--samples", str(sets / "same.npz"), "--ref", str(sets / "ref.npz")]) == 2
    msg = capsys.readouterr().err
    assert msg.startswith("error: ") and msg.count("\n") == 1, msg
    assert "Inception-v3 FID weights are missing" in msg and "--inception_weights" in msg
    assert "--features classifier:" in msg and "train-classifier" in msg


def test_unknown_feature_network_is_a_clear_error():
    with pytest.raises(ValueError, match="classifier:FILE"):
        feature_network("vgg16")


def test_train_classifier_cli(tmp_path, capsys):
    x, y = load_digits(8).images[:200].numpy(), load_digits(8).labels[:200].numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert main(["train-classifier", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "c.pt"),
                 "--size", "8", "--channels", "1", "--max_iters", "3", "--width", "8"]) == 0
    assert "--features classifier:" in capsys.readouterr().out
    assert ClassifierFeatures(tmp_path / "c.pt").meta["n"] == 200


def test_a_folder_of_pngs_scores_as_its_array(clf, sets, capsys, tmp_path):
    x = np.load(sets / "same.npz")["x"][:100]
    np.savez(tmp_path / "s.npz", x=x)
    for i, img in enumerate(x[:, 0]):
        Image.fromarray(img).save(tmp_path / f"{i:03d}.png")  # grey PNGs are read back as RGB
    feats = f"classifier:{clf}"
    folder = run_cli(capsys, "--samples", str(tmp_path), "--ref", str(sets / "ref.npz"), "--features", feats)
    array = run_cli(capsys, "--samples", str(tmp_path / "s.npz"), "--ref", str(sets / "ref.npz"), "--features", feats)
    assert folder["n"] == 100 and folder["frechet_distance"] == pytest.approx(array["frechet_distance"], rel=1e-5)
