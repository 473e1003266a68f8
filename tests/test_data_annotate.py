"""Annotation reads full-resolution images (--feature_data, or an image folder given as --data); pixel features are computed in chunks."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.annotate import pixels
from sgengine.annotate.__main__ import feature_images
from sgengine.data import load_data, load_folder
from sgengine.data.pack import pack


def _src(root):
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


class _ViTLike:
    size = (32, 32)  # the extractor's input size


def _args(**kw):
    return argparse.Namespace(**{"feature_data": None, "size": 8, "channels": 3, "quiet": True, "data": "d", **kw})


def test_features_read_the_source_at_the_extractor_size(tmp_path):
    src = _src(tmp_path / "src")
    pack(src, tmp_path / "p8", 8, workers=0, progress=False)
    pack(src, tmp_path / "p32", 32, workers=0, progress=False)
    train = load_data(str(tmp_path / "p8"), 8)
    from_src = feature_images(_args(feature_data=str(src)), train, _ViTLike())
    assert from_src.shape == (6, 3, 32, 32) and torch.equal(from_src, load_folder(src, 32, progress=False).images)
    assert torch.equal(feature_images(_args(feature_data=str(tmp_path / "p32")), train, _ViTLike()), from_src)
    assert feature_images(_args(), train, _ViTLike()) is train.images  # a pack at the training size: its images
    # an image folder as --data is itself the full-resolution source: decoded at the extractor's size
    from_folder = feature_images(_args(data=str(src)), load_data(str(src), 8), _ViTLike())
    assert torch.equal(from_folder, from_src)
    pack(src / "c0", tmp_path / "other", 32, workers=0, progress=False)
    with pytest.raises(ValueError, match="not the same 6 of --data"):
        feature_images(_args(feature_data=str(tmp_path / "other")), train, _ViTLike())
    with pytest.raises(ValueError, match="at 8 px but the model takes 32 px"):
        feature_images(_args(feature_data=str(tmp_path / "p8")), train, _ViTLike())


def test_pixel_features_in_chunks_match_the_exact_pca(monkeypatch):
    monkeypatch.setattr(pixels, "CHUNK", 7)  # several chunks
    images = torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8)
    x = images.flatten(1).double() / 127.5 - 1
    torch.testing.assert_close(pixels.pixel_features(images), x.float())
    xc = x - x.mean(0)
    ref = xc @ torch.linalg.svd(xc, full_matrices=False)[2][:5].T
    got = pixels.pixel_features(images, 5).double()
    torch.testing.assert_close(got.abs(), ref.abs(), atol=1e-5, rtol=1e-5)  # each axis up to its sign
    assert pixels.pixel_features(images, 5).dtype == torch.float32
