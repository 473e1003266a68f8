"""Online self-guidance (SPEC section 2): clustering, the two-stage trainer, exemplar / prototype
conditioning and the offline variant, on the tiny U-ViT and 8x8 digits."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sgtest import tiny_online_run, torchrun

from sgengine.annotate.io import load_annotations
from sgengine.config import OnlineConfig, apply_overrides, preset
from sgengine.data import load_digits
from sgengine.diffusion.flow import flow_path
from sgengine.online import (OnlineClustering, OnlineTrainer, feature_time, load_online, offline_annotations,
                             prototype_condition, prototype_of_exemplar, sample_prototypes, sk_weight)


def tiny(tmp_path, **kw):
    over = {"out": str(tmp_path / "run"), "device": "cpu", "batch_size": 32, **kw}
    return apply_overrides(preset("uvit-tiny-online"), over)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short run across the stage switch through the CLI (which must pick OnlineTrainer)."""
    return tiny_online_run(tmp_path_factory.mktemp("online") / "run", steps=8, batch_size=32, sample_steps=2, grid=2)


# -- clustering ---------------------------------------------------------------------------------

def test_sk_weight_warms_up_linearly():
    assert sk_weight(0, 100, 0.5) == 0.0
    assert sk_weight(25, 100, 0.5) == 0.5
    assert sk_weight(80, 100, 0.5) == 1.0
    assert sk_weight(0, 100, 0.0) == 1.0 and sk_weight(0, 0, 1.0) == 1.0  # no warm-up stage


def test_sk_loss_only_on_samples_inside_the_window():
    torch.manual_seed(0)
    cl = OnlineClustering(16, OnlineConfig(prototypes=5, head_hidden=32, t_low=0.8, t_high=0.9))
    f = torch.randn(12, 16)
    t = torch.tensor([0.85, 0.1, 0.82, 0.95, 0.88, 0.5, 0.81, 0.3, 0.89, 0.0, 0.86, 1.0])
    inside = (t > 0.8) & (t < 0.9)
    garbage = torch.where(inside[:, None], f, torch.full_like(f, float("nan")))  # outside rows must be ignored
    assert torch.allclose(cl.loss(garbage, t), cl.loss(f[inside], t[inside]))
    outside = torch.tensor([0.1, 0.5, 0.95, 0.3])
    zero = cl.loss(torch.randn(4, 16), outside)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in cl.parameters() if p.grad is not None)


def test_assign_matches_argmax_of_cosine_scores_and_patches_shape():
    torch.manual_seed(0)
    cl = OnlineClustering(16, OnlineConfig(prototypes=7, head_hidden=32, feature="patches")).eval()
    feats = {"cls": torch.randn(3, 16), "patches": torch.randn(3, 4, 16)}
    ids = cl.assign(feats)
    assert ids.shape == (3, 4)
    z = torch.nn.functional.normalize(cl.head(feats["patches"].reshape(-1, 16)), dim=1)
    assert torch.equal(ids.reshape(-1), (z @ cl.vectors.T).argmax(1))


def test_bad_online_config_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="t_low"):
        OnlineClustering(8, OnlineConfig(t_low=0.9, t_high=0.8))
    with pytest.raises(ValueError, match="--arch uvit --objective flow"):
        OnlineTrainer(tiny(tmp_path, arch="unet"))
    with pytest.raises(ValueError, match="drop --deepspeed"):
        OnlineTrainer(tiny(tmp_path, deepspeed=True))
    with pytest.raises(ValueError, match="--uvit.patch_cond true"):
        OnlineTrainer(tiny(tmp_path, **{"online.feature": "patches"}))


# -- trainer ------------------------------------------------------------------------------------

def test_stop_gradient_keeps_sk_loss_out_of_the_backbone(tmp_path):
    tr = OnlineTrainer(tiny(tmp_path), log=lambda *a: None)

    def backbone_grads(loss_fn, x, cond):
        tr.opt.zero_grad(set_to_none=True)
        loss_fn(tr.net, x, generator=torch.Generator().manual_seed(1), **cond).mean().backward()
        return [None if p.grad is None else p.grad.clone() for p in tr.net.parameters()]

    for step in (10, 30):  # stage 1 (null token) and stage 2 (prototype condition); switch at 20 of 40
        tr.step = step  # warm-up weight > 0
        x, cond = tr.batch()
        assert ("y" in cond) == (step > tr.switch_step)
        with_sk = backbone_grads(tr.loss_fn, x, cond)
        assert tr.sk_window[-1] > 0 and tr.clustering.head[0].weight.grad.abs().sum() > 0  # SK is active
        without = backbone_grads(tr.objective.loss, x, cond)
        assert sum(g is not None for g in with_sk) > 0
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(with_sk, without))
    outside = torch.full((x.shape[0],), 0.1)  # no sample in the window: L_SK = 0, finite
    assert tr.sk_loss(tr.net, x, outside).item() == 0.0


def test_stage_switch_copies_the_live_network_into_ema(tmp_path):
    tr = OnlineTrainer(tiny(tmp_path, steps=4), log=lambda *a: None)
    assert tr.switch_step == 2
    tr.train_step(), tr.train_step()
    ema, live = tr.ema.state_dict(), tr.net.state_dict()
    assert not all(torch.equal(ema[k], live[k]) for k in live)
    x, cond = tr.batch()  # the first stage-2 batch performs the switch
    assert all(torch.equal(tr.ema.state_dict()[k], v) for k, v in tr.net.state_dict().items())
    assert cond["y"].shape == (32, tr.cfg.uvit.dim) and cond["null"].dtype == torch.bool


def test_every_batch_after_the_first_is_prefetched_in_both_stages(tmp_path):
    # Stage 2's condition drops come from the step's own draw, so the loader's look-ahead at the
    # next indices holds across the switch and across micro-steps.
    tr = OnlineTrainer(tiny(tmp_path, steps=4, grad_accum=2, batch_size=8), log=lambda *a: None)
    for _ in range(4):
        tr.train_step()
    assert tr.step == 4 > tr.switch_step and (tr.loader.hits, tr.loader.misses) == (7, 1)


def test_stage_one_is_unconditional_and_prototypes_stay_unit_norm(tmp_path):
    tr = OnlineTrainer(tiny(tmp_path, steps=6), log=lambda *a: None)
    assert tr.batch()[1] == {}  # y=None: the null token for every sample
    with torch.no_grad():
        tr.clustering.prototypes.weight.mul_(3.0)
    for _ in range(4):  # across the switch at step 3
        tr.train_step()
        norms = tr.clustering.prototypes.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_short_run_writes_checkpoint_clustering_grid_and_logs(run_dir):
    ckpt = run_dir / "ckpt" / "step_00000008"
    assert (ckpt / "clustering.safetensors").is_file() and (run_dir / "samples.png").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["online"]["switch_step"] == 4 and sum(meta["online"]["usage"]) == 4 * 32  # 4 stage-2 batches
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in recs if "sk_loss" in r]
    assert [r["stage"] for r in online] == [1, 2] and all("cluster_nmi" in r and "cluster_used" in r for r in online)
    for r in online:  # the usage histogram of the held-out batch, consistent with its summary
        counts = r["cluster_counts"]
        assert len(counts) == 10 and sum(counts) == 256 and sum(c > 0 for c in counts) == r["cluster_used"]
    from PIL import Image
    with Image.open(run_dir / "cluster_usage.png") as im:
        assert im.size == (640, 360) and len(set(im.getdata())) > 2  # frame, text and bars


def test_resume_restores_clustering_usage_and_the_switch(run_dir, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(run_dir, out)
    tr = OnlineTrainer(tiny(tmp_path, out=str(out), steps=20, resume=True), log=lambda *a: None)
    saved = load_online(run_dir)
    assert tr.step == 8 and tr.switch_step == 4 and torch.equal(tr.usage, saved.usage)
    assert all(torch.equal(v, saved.clustering.state_dict()[k]) for k, v in tr.clustering.state_dict().items())
    assert tr.batch()[1]["y"].shape == (32, tr.cfg.uvit.dim)  # still stage 2


# -- sampling -----------------------------------------------------------------------------------

def test_exemplar_gets_the_prototype_of_its_own_features(run_dir):
    gen = load_online(run_dir)
    image = load_digits(8).images[5]
    pid = prototype_of_exemplar(gen, image, seed=3)
    x = image.float()[None] / 127.5 - 1
    t = torch.full((1,), feature_time(gen.clustering.cfg))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, feats = gen.gen.net(flow_path(x, eps, t)[0], t, return_features=True)
        z = torch.nn.functional.normalize(gen.clustering.head(feats["cls"]), dim=1)
    assert pid == int((z @ gen.clustering.vectors.T).argmax())
    with pytest.raises(ValueError, match="resize"):
        prototype_of_exemplar(gen, torch.zeros(1, 16, 16, dtype=torch.uint8))


def test_prototype_condition_and_sampling(run_dir):
    gen = load_online(run_dir)
    cond = prototype_condition(gen, [0, 3])
    assert list(cond) == ["y"] and torch.equal(cond["y"], gen.clustering.vectors[[0, 3]])
    assert sample_prototypes(gen, [0, 3], steps=2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        prototype_condition(gen, [10])


# -- offline variant ----------------------------------------------------------------------------

def test_offline_variant_writes_a_loadable_annotation_file(run_dir, tmp_path):
    data = load_digits(8)
    data.images, data.labels, data.names = data.images[:60], data.labels[:60], data.names[:60]
    ann = offline_annotations(run_dir, data, 4, tmp_path / "ann.safetensors")
    back = load_annotations(tmp_path / "ann.safetensors")
    assert len(back) == 60 and back.k == 4 and torch.equal(back.ids, ann.ids)
    assert back.settings["method"] == "offline self-guidance" and back.settings["t"] == 0.8


def test_patch_level_variant_conditions_every_patch(tmp_path):
    cfg = tiny(tmp_path, steps=4, batch_size=16, **{"online.feature": "patches", "uvit.patch_cond": True})
    tr = OnlineTrainer(cfg, log=lambda *a: None)
    for _ in range(3):  # across the switch at step 2
        assert torch.isfinite(tr.train_step())
    x, cond = tr.batch()
    n, d = cfg.uvit.num_patches, cfg.uvit.dim
    assert cond["y_patch"].shape == (16, n, d) and not cond["y"].any()  # y = 0: the zero condition token
    assert int(tr.usage.sum()) == 2 * 16 * n  # two stage-2 batches of 16 images x N patches
    ids = prototype_of_exemplar(tr, x[0])
    assert ids.shape == (n,)
    assert sample_prototypes(tr.online_generator(), ids[None], steps=1).shape == (1, 1, 8, 8)


def test_sample_cli_by_prototype_and_by_exemplar(run_dir, tmp_path, capsys):
    from PIL import Image

    from sgengine.data import load_digits
    from sgengine.sample import main as sample_main

    assert sample_main(["--ckpt", str(run_dir), "--n", "4", "--steps", "3", "--prototypes", "1", "3",
                        "--out", str(tmp_path / "p.png")]) == 0
    clusters = np.load(tmp_path / "p.npz")["clusters"]
    assert clusters.tolist() == [1, 1, 3, 3]
    Image.fromarray(load_digits(8).images[0, 0].numpy()).save(tmp_path / "ex.png")
    assert sample_main(["--ckpt", str(run_dir), "--n", "2", "--steps", "3", "--like", str(tmp_path / "ex.png"),
                        "--out", str(tmp_path / "like.png")]) == 0
    assert "exemplar" in capsys.readouterr().out and (tmp_path / "like.png").exists()


def test_sample_cli_refuses_prototypes_on_a_plain_run(tmp_path, capsys):
    from sgengine.sample import main as sample_main
    from sgengine.training.trainer import Trainer

    cfg = dataclasses.replace(preset("tiny"), out=str(tmp_path / "plain"), steps=2, condition="labels")
    Trainer(cfg).run()
    assert sample_main(["--ckpt", str(tmp_path / "plain"), "--prototypes", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "online self-guidance run" in capsys.readouterr().err


# -- two ranks under torchrun -------------------------------------------------------------------

@pytest.mark.distributed
def test_two_ranks_cluster_the_global_batch_and_stay_in_sync(tmp_path):
    """tests/dist_online.py: L_SK over two ranks' unequal shares equals one process's on the whole
    batch (loss, phi / M gradients, BN statistics), then a DDP run across the stage switch."""
    proc = torchrun("dist_online.py", tmp_path, timeout=300)
    assert "dist_online OK" in proc.stdout, proc.stdout[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("net", "ema", "clustering"):  # DDP averages the network; phi and M get equal gradients
        for k, v in r0[part].items():
            torch.testing.assert_close(r1[part][k], v, rtol=0, atol=0, msg=f"{part}.{k}")
    assert torch.equal(r0["usage"], r1["usage"]) and int(r0["usage"].sum()) == 3 * 2 * 16  # stage 2 x global batch
    gen = load_online(tmp_path / "run")
    assert gen.usage.tolist() == r0["usage"].tolist()
    imgs = sample_prototypes(gen, [0, 1], steps=2)
    assert imgs.shape == (2, 1, 8, 8) and torch.isfinite(imgs).all()
