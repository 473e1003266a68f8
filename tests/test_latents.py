"""Latent diffusion with a tiny, randomly initialised diffusers AutoencoderKL: encode (resumable),
train on the latents, sample with SAG in latent space, decode to PNG; mismatches refused."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sgtest import assert_resume_is_exact

from sgengine.config import preset
from sgengine.data import latents as L
from sgengine.data import load_data, open_pack
from sgengine.data.__main__ import main
from sgengine.data.pack import pack
from sgengine.data.store import DATA, MANIFEST
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


def _moments(root, n=3):
    """The tiny VAE's scaled posterior mean and std of the pack's first n images, fp16 NCHW."""
    vae = L.load_vae(root / "vae")
    dist = vae.encode(open_pack(root / "pack").images[:n].float() / 127.5 - 1).latent_dist
    return (dist.mean * vae.config.scaling_factor).half(), (dist.std * vae.config.scaling_factor).half()


def test_encode_keeps_the_scaled_posterior_mean_and_std_in_fp16(setup):
    root, man = setup
    assert (man["kind"], man["size"], man["channels"], man["dtype"], man["factor"]) == ("latents", 8, 4, "float16", 2)
    assert man["posterior"] == "mean_std" and man["bytes"] == 12 * 8 * 8 * 8 * 2 == (root / "lat" / DATA).stat().st_size
    lat = open_pack(root / "lat", 8, 4)  # checked against the 4 channels the model sees, not the 8 stored
    mean, std = _moments(root)
    assert lat.images.shape == (12, 4, 8, 8) and lat.moments.shape == (12, 8, 8, 8)
    assert lat.images.dtype == torch.float16 and torch.equal(lat.images[:3], mean)
    assert torch.equal(lat.moments[:3, 4:], std) and bool((std > 0).all())
    assert lat.labels.tolist() == open_pack(root / "pack").labels.tolist() and lat.stats["dtype"] == "float16"


def test_posterior_mean_flag_writes_the_old_mean_only_pack(setup, tmp_path):
    root, _ = setup
    assert main(["encode", str(root / "pack"), str(tmp_path / "m"), "--vae", str(root / "vae"), "--batch_size", "5",
                 "--device", "cpu", "--posterior", "mean", "--quiet"]) == 0
    old = open_pack(tmp_path / "m", 8, 4)
    assert old.manifest["posterior"] == "mean" and old.manifest["bytes"] == 12 * 8 * 8 * 4 * 2 and old.moments is None
    assert torch.equal(old.images[:3], _moments(root)[0])  # scaling * mean in fp16, as before the posterior
    with pytest.raises(ValueError, match="complete latent pack with posterior 'mean_std', not 'mean'"):
        L.encode(root / "pack", root / "lat", root / "vae", device="cpu", progress=False, posterior="mean")
    man = json.loads((tmp_path / "m" / MANIFEST).read_text())
    del man["posterior"]  # a pack written before the field
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(man))
    legacy = open_pack(tmp_path / "m", 8, 4)
    assert legacy.moments is None and torch.equal(legacy.images, old.images)
    assert torch.equal(legacy.batch(torch.tensor([1, 0]), "cpu"), old.images[[1, 0]].float())
    from sgengine.annotate.pixels import pixel_features  # self-labels see the mean of a posterior pack

    assert torch.equal(pixel_features(open_pack(root / "lat").images, 4), pixel_features(old.images, 4))


def test_stats_are_those_of_the_drawn_latent(setup):
    root, man = setup
    rows = open_pack(root / "lat").moments.double()
    mean, std = rows[:, :4], rows[:, 4:]
    want_var = mean.var((0, 2, 3), unbiased=False) + (std ** 2).mean((0, 2, 3))  # law of total variance
    np.testing.assert_allclose(man["stats"]["mean"], mean.mean((0, 2, 3)).numpy(), atol=2e-6)
    np.testing.assert_allclose(man["stats"]["std"], want_var.sqrt().numpy(), atol=2e-6)


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


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_bad_posterior_std_is_refused_in_one_line(setup, tmp_path, monkeypatch, capsys, bad):
    root, _ = setup
    real = L.posterior_rows

    def broken(*args):
        z = real(*args)
        z[0, 0, 0, -1] = bad  # one std entry of the first row
        return z
    monkeypatch.setattr(L, "posterior_rows", broken)
    assert main(["encode", str(root / "pack"), str(tmp_path / "x"), "--vae", str(root / "vae"), "--device", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: the VAE gave") and "rows 0..11" in err
    assert ("non-finite" if bad != bad else "negative posterior std") in err


def test_training_draws_the_posterior_and_resumes_bit_identically(setup, tmp_path):
    root, _ = setup
    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, data=str(root / "lat"), out=str(tmp_path), steps=4, batch_size=4, grad_accum=2,
                              condition="labels", sample_every=0, sample_steps=2, grid_rows=2, grid_cols=1,
                              model=dataclasses.replace(tiny.model, in_channels=4))
    straight, resumed = assert_resume_is_exact(Trainer, cfg, kill_at=2)
    assert (straight.loader.hits, straight.loader.misses) == (7, 1)  # prefetched 2C rows; drawn after the copy
    idx, mean = torch.tensor([0, 0, 5]), straight.data.images[[0, 0, 5]].float()
    draws = [straight._images(idx, straight._posterior_generator(m)) for m in (0, 1)]
    assert draws[0].shape == mean.shape and not torch.equal(draws[0], mean)  # a draw, not the mean
    assert not torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0], draws[1])  # fresh eps per row, shard


def test_zero_std_trains_exactly_like_the_mean_pack(setup, tmp_path):
    """The posterior draw has its own stream: it shifts neither the indices nor the objective's noise."""
    import shutil

    root, _ = setup
    L.encode(root / "pack", tmp_path / "mean", root / "vae", batch_size=5, device="cpu", progress=False,
             posterior="mean")
    shutil.copytree(root / "lat", tmp_path / "zero")
    rows = np.memmap(tmp_path / "zero" / DATA, dtype=np.float16, mode="r+", shape=(12, 8, 8, 8))
    rows[..., 4:] = 0
    rows.flush()
    tiny, nets = preset("tiny"), []
    for data in ("mean", "zero"):
        cfg = dataclasses.replace(tiny, data=str(tmp_path / data), out=str(tmp_path / f"run-{data}"), steps=2,
                                  batch_size=4, grad_accum=2, condition="labels", sample_steps=2, grid_rows=2,
                                  grid_cols=1, model=dataclasses.replace(tiny.model, in_channels=4))
        tr = Trainer(cfg)
        for _ in range(cfg.steps):
            tr.train_step()
        nets.append(tr.net.state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_online_self_guidance_trains_on_posterior_latents(setup, tmp_path):
    from sgengine.config import apply_overrides
    from sgengine.online import OnlineTrainer

    root, _ = setup
    cfg = apply_overrides(preset("uvit-tiny-online"), {
        "data": str(root / "lat"), "out": str(tmp_path / "run"), "device": "cpu", "steps": 4, "batch_size": 8,
        "log_every": 2, "ckpt_every": 0, "sample_steps": 2, "grid_rows": 2, "grid_cols": 1, "uvit.in_channels": 4})
    tr = OnlineTrainer(cfg, log=lambda *a: None)
    run = tr.run()  # across the stage switch: prototypes of drawn latents; held-out metrics on the means
    assert tr.stage == 2 and int(tr.usage.sum()) == 2 * 8 and run["grid"].exists()
