"""Latent diffusion with a tiny, randomly initialised diffusers AutoencoderKL: encode (resumable),
train on the latents, sample with SAG in latent space, decode to PNG; mismatches refused."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.config import preset
from sgengine.data import latents as L
from sgengine.data import load_data, open_pack
from sgengine.data.__main__ import main
from sgengine.data.pack import pack
from sgengine.data.store import DATA
from sgengine.sampling import load_generator, sample
from sgengine.training.trainer import Trainer

pytest.importorskip("diffusers")


def _vae(path, latent_channels=4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "src" / f"c{i % 2}" / f"{i}.png")
    pack(root / "src", root / "pack", 16, workers=0, progress=False)
    vae = _vae(root / "vae")
    man = L.encode(root / "pack", root / "lat", vae, batch_size=5, device="cpu", progress=False)
    return root, man


def test_encode_is_the_scaled_posterior_mean_in_fp16(setup):
    root, man = setup
    assert (man["kind"], man["size"], man["channels"], man["dtype"], man["factor"]) == ("latents", 8, 4, "float16", 2)
    lat = open_pack(root / "lat", 8, 4)
    vae = L.load_vae(root / "vae")
    x = open_pack(root / "pack").images[:3].float() / 127.5 - 1
    want = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half()
    assert lat.images.dtype == torch.float16 and torch.equal(lat.images[:3], want)
    assert lat.labels.tolist() == open_pack(root / "pack").labels.tolist() and lat.stats["dtype"] == "float16"


def test_killed_encode_resumes_to_the_same_bytes(setup, monkeypatch):
    root, _ = setup
    real, calls = L.RowWriter.write, []

    def dies(self, cursor, rows):
        calls.append(cursor)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, cursor, rows)
    monkeypatch.setattr(L.RowWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        L.encode(root / "pack", root / "lat2", root / "vae", batch_size=5, device="cpu", progress=False)
    monkeypatch.setattr(L.RowWriter, "write", real)
    assert main(["encode", str(root / "pack"), str(root / "lat2"), "--vae", str(root / "vae"), "--batch_size", "5",
                 "--device", "cpu", "--quiet"]) == 0
    assert (root / "lat2" / DATA).read_bytes() == (root / "lat" / DATA).read_bytes()


def test_train_on_latents_sample_with_sag_and_decode(setup, tmp_path):
    root, _ = setup
    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, data=str(root / "lat"), out=str(tmp_path / "run"), steps=2, batch_size=4,
                              condition="labels", sample_steps=2, grid_rows=2, grid_cols=2,
                              model=dataclasses.replace(tiny.model, in_channels=4))
    run = Trainer(cfg).run()
    with Image.open(run["grid"]) as grid:  # decoded: 16-px RGB images, 2 x 2, pad 1, scale 2
        assert grid.mode == "RGB" and grid.size == (2 * (2 * 17 + 1), 2 * (2 * 17 + 1))
    gen = load_generator(tmp_path / "run")
    plain = sample(gen, torch.tensor([0, 1]), w=1.0, steps=3)
    sag = sample(gen, torch.tensor([0, 1]), w=1.0, steps=3, sag_scale=0.5)  # blur 9 / sigma 1 on the 8x8 latents
    assert sag.shape == (2, 4, 8, 8) and torch.isfinite(sag).all() and not torch.equal(sag, plain)
    pix = L.to_images(sag, cfg.data)
    assert pix.dtype == torch.uint8 and pix.shape == (2, 3, 16, 16)
    from sgengine.sample import main as sample_main

    assert sample_main(["--ckpt", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--device", "cpu",
                        "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 3, 16, 16)  # the CLI decodes too


def test_latent_mismatches_are_refused(setup, tmp_path):
    root, _ = setup
    with pytest.raises(ValueError, match=r"4-channel latents \(VAE .*vae\) but the model takes 3 channels"):
        load_data(str(root / "lat"), 8, 3)
    with pytest.raises(ValueError, match="8x8 latents but the model takes 16x16.*pack of 32-px images"):
        load_data(str(root / "lat"), 16, 4)
    other = _vae(tmp_path / "vae3", latent_channels=3)
    with pytest.raises(ValueError, match="decodes 3-channel latents"):
        L.decode(torch.zeros(1, 4, 8, 8), {"path": str(other), "scaling_factor": 0.18215})
    with pytest.raises(ValueError, match="holds latents, not images"):
        L.encode(root / "lat", tmp_path / "x", other, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="no VAE at"):
        L.load_vae(tmp_path / "nowhere")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot load a VAE"):
        L.load_vae(tmp_path / "junk.safetensors")
