import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.annotate.io import Annotations, load_annotations, save_annotations
from sgengine.config import preset
from sgengine.data import load_array, load_data, load_digits, load_folder
from sgengine.train import self_labels
from sgengine.training.trainer import Trainer


def _folder(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = np.random.randint(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "cats" / "notes.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_corrupt_image_is_skipped_and_reported(tmp_path, capsys):
    data = load_folder(_folder(tmp_path), size=8, progress=False)
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("broken.jpg")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    cfg = dataclasses.replace(preset("tiny"), data=str(tmp_path), out=str(tmp_path / "run"), steps=2,
                              condition="labels", model=dataclasses.replace(preset("tiny").model, in_channels=3))
    Trainer(cfg, log=print)
    assert "skipped 1 unreadable file" in capsys.readouterr().out


def test_folder_without_images_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        load_folder(tmp_path, size=8)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_data(str(tmp_path / "missing"), 8)


def test_npz_arrays_in_any_layout(tmp_path):
    x = np.random.randint(0, 255, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    d = load_array(tmp_path / "a.npz")
    assert d.images.shape == (5, 3, 12, 12) and torch.equal(d.images.permute(0, 2, 3, 1), torch.from_numpy(x))
    assert d.labels.tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "b.npy", np.random.rand(4, 1, 8, 8).astype(np.float32) * 2 - 1)
    assert load_array(tmp_path / "b.npy").images.shape == (4, 1, 8, 8)
    np.savez(tmp_path / "c.npz", foo=x)
    with pytest.raises(KeyError, match="'x' or 'images'"):
        load_array(tmp_path / "c.npz")


def test_digits_are_real_images():
    d = load_digits(16)
    assert d.images.shape == (1797, 1, 16, 16) and d.labels.unique().numel() == 10
    assert d.images.float().std() > 30  # not blank


def test_annotation_round_trip_and_validation(tmp_path):
    ann = Annotations(torch.tensor([0, 2, 1, 2]), 3, layout=torch.ones(4, 1, 8, 8, dtype=torch.uint8),
                      settings={"method": "boxes", "extractor": "x"})
    save_annotations(tmp_path / "a.safetensors", ann)
    back = load_annotations(tmp_path / "a.safetensors")
    assert torch.equal(back.ids, ann.ids) and back.k == 3 and back.settings["method"] == "boxes"
    assert back.counts().tolist() == [1, 1, 2]
    assert back.vector(torch.tensor([1])).tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Annotations(torch.tensor([0, 3]), 3)


def test_trainer_self_labels_cluster_without_labels(tmp_path):
    from sklearn.metrics import normalized_mutual_info_score

    cfg = dataclasses.replace(preset("tiny"), out=str(tmp_path / "run"), steps=2, k=10, pca_dim=0)
    with pytest.raises(FileNotFoundError, match="self-labels .* are not made yet"):
        Trainer(cfg)  # the trainer never clusters: the train CLI makes the file first
    self_labels(cfg)
    tr = Trainer(cfg)
    ann = load_annotations(tmp_path / "run" / "annotations.safetensors")
    assert tr.cfg.model.num_classes == 10 and len(ann) == 1797
    assert normalized_mutual_info_score(tr.data.labels, ann.ids) > 0.5  # pixels k-means finds digits
