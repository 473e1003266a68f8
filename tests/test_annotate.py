"""Self-annotation pipeline: features, LOST, TEMI (+ cluster bound), STEGO, CLI end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sgengine.annotate.__main__ import main
from sgengine.annotate.features import DiffusionExtractor, PixelExtractor, ViTExtractor, extract
from sgengine.annotate.io import load_annotations
from sgengine.annotate.lost import box_masks, lost_boxes, seed_component
from sgengine.annotate.pixels import pixel_features
from sgengine.annotate.stego import StegoConfig, codes_of, segment_codes, segment_masks, train_stego
from sgengine.annotate.temi import (TEMIConfig, TEMIHeads, cluster_count_bound, cosine_knn, distinct_clusters,
                                   final_head_loss, scaled_schedule, temi_cluster, temi_loss)
from sgengine.eval.cluster import cluster_report

try:
    import timm
except ImportError:  # the ViT extractor is optional (pip install sgengine[timm])
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="needs timm")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops


# Small heads and a faster teacher for ~100-step CPU runs (the defaults are the paper's).
SMALL_TEMI = TEMIConfig(heads=4, hidden=128, bottleneck=64, knn=10, batch_size=128, lr=1e-2, momentum=0.95)


def _blobs(n_per, k, d=16, sep=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    y = torch.arange(k).repeat_interleave(n_per)
    return centers[y] + torch.randn(len(y), d, generator=g), y


# ------------------------------------------------------------------------------------ LOST

def _object_keys(h, w, rows, cols, d=16, seed=0):
    """Keys of a background vector everywhere, and an anti-correlated object vector in one region."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(d, generator=g)
    keys = bg.expand(h, w, d).clone()
    keys[rows, cols] = -bg + 0.3 * torch.randn(d, generator=g)
    return (keys + 0.1 * torch.randn(h, w, d, generator=g)).view(1, h * w, d)


@pytest.mark.parametrize("size,expected", [(32, [12, 8, 28, 20]), (20, [7, 5, 18, 13])])
def test_lost_finds_the_object_box(size, expected):
    keys = _object_keys(8, 8, slice(2, 5), slice(3, 7))  # rows 2-4, cols 3-6 of an 8x8 grid
    boxes, masks = lost_boxes(keys, (8, 8), size)
    assert boxes.tolist() == [expected]  # grid extent x [3, 7), y [2, 5) scaled by size / 8, rounded out
    assert masks.shape == (1, 1, size, size) and masks.dtype == torch.uint8
    x0, y0, x1, y1 = expected
    assert masks.sum() == (x1 - x0) * (y1 - y0) and masks[0, 0, y0:y1, x0:x1].all()


def test_lost_keeps_the_seed_component_of_two_objects():
    keys = _object_keys(8, 8, slice(1, 3), slice(1, 3)).view(8, 8, -1)
    keys[5:8, 4:8] = keys[1, 1]  # a second, larger, disconnected region of the same object feature
    boxes, _ = lost_boxes(keys.reshape(1, 64, -1), (8, 8), 8)
    assert boxes.tolist() == [[1, 1, 3, 3]]  # the seed (lowest degree, first index) lies in the first


def test_seed_component_matches_scipy_label():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(20, 7, 9, generator=g) > 0.45
    seed = torch.randint(63, (20,), generator=g)
    comp = seed_component(mask, seed)
    for b in range(20):
        lab, _ = ndimage.label(mask[b].numpy())
        label = lab.flat[int(seed[b])]
        want = lab == label if label else (np.arange(63) == int(seed[b])).reshape(7, 9)
        assert (comp[b].numpy() == want).all()


def test_box_masks_are_exact_rectangles():
    m = box_masks(torch.tensor([[0, 0, 16, 16], [3, 5, 4, 9]]), 16)
    assert m[0].all() and m[1].sum() == 4 and m[1, 0, 5:9, 3].all()


# ------------------------------------------------------------------------------------ TEMI

def test_temi_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s1, s2, t1, t2 = (torch.randn(3, 6, 5, generator=g) for _ in range(4))
    prior = torch.softmax(torch.randn(3, 5, generator=g), -1)
    cfg = TEMIConfig()
    loss, new_prior = temi_loss(s1, s2, t1, t2, prior, cfg)
    q = lambda z: torch.softmax(z / 0.1, -1)  # noqa: E731
    p_k = 0.9 * prior + 0.1 * torch.cat([q(t1), q(t2)], 1).mean(1)
    w = (q(t1) * q(t2)).sum(-1).mean(0)
    pmi = lambda s, t: -torch.log(((q(s) * q(t)) ** 0.6 / p_k[:, None]).sum(-1))  # noqa: E731
    want = 0.5 * (w * pmi(s1, t2)).mean(-1) + 0.5 * (w * pmi(s2, t1)).mean(-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_prior, p_k)


def test_temi_uses_all_clusters_on_separated_blobs():
    x, y = _blobs(80, 5)
    ids, info = temi_cluster(x, 5, epochs=30, cfg=SMALL_TEMI, progress=False)
    r = cluster_report(ids, 5, y)
    assert r["utilisation"] == 1.0 and r["nmi"] > 0.9, r
    assert 0 <= info["head"] < 4 and info["loss"][-1] < info["loss"][0]
    assert info["head"] == int(np.argmin(info["head_loss"]))
    assert info["distinct"] == pytest.approx(5, abs=0.5) and info["distinct_utilisation"] == info["distinct"] / 5


def test_final_head_loss_is_the_mean_pair_loss_with_the_data_prior():
    """The head-selection loss, chunked over rows, equals eq. 1 on all (x, neighbour) pairs at once
    (teacher on both sides, p_k = the mean teacher probability over the data)."""
    x = F.normalize(torch.randn(37, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    heads, nbrs, cfg = TEMIHeads(8, 5, heads=3, hidden=16, bottleneck=8), cosine_knn(x, 4), TEMIConfig()
    t = heads(x)
    prior = F.softmax(t / cfg.temperature, -1).mean(1)
    a, b = torch.arange(37).repeat_interleave(4), nbrs.reshape(-1)
    want, _ = temi_loss(t[:, a], t[:, b], t[:, a], t[:, b], prior, TEMIConfig(prior_momentum=1.0))
    torch.testing.assert_close(final_head_loss(heads, x, nbrs, cfg, batch_size=8), want)
    # Heads a group at a time (here one: the memory cap is a byte), as at ImageNet scale.
    torch.testing.assert_close(final_head_loss(heads, x, nbrs, cfg, batch_size=8, max_bytes=1), want)
    torch.testing.assert_close(heads(x, slice(1, 3)), t[1:3])


def test_temi_schedules_scale_with_the_run():
    cfg = TEMIConfig()
    assert scaled_schedule(cfg, 20_000) == pytest.approx((0.996, 5e-4))  # the paper's run length
    assert scaled_schedule(cfg, 80_000) == pytest.approx((0.996, 5e-4))
    assert scaled_schedule(cfg, 800) == pytest.approx((0.9, 1.25e-2))  # digits: 100 epochs x 8 steps
    assert scaled_schedule(cfg, 10) == pytest.approx((0.9, 1.25e-2))  # stretched at most 25x
    assert scaled_schedule(TEMIConfig(momentum=0.99, lr=1e-3), 800) == (0.99, 1e-3)


def test_temi_defaults_beat_kmeans_on_digits():
    """Digits, pixel features, K=10, TEMIConfig() (16 heads, run-scaled schedules), 40 epochs (320
    steps; the CLI's 100 take ~2.5x longer). Measured NMI 0.743 (40 epochs), 0.823 (60) against
    k-means' 0.707; 30 epochs reach only 0.656. With the paper's fixed m0 = 0.996, lr = 5e-4 the
    800-step run reached NMI 0.56-0.57."""
    from sklearn.metrics import normalized_mutual_info_score

    from sgengine.annotate.labels import self_label
    from sgengine.data import load_data
    data = load_data("digits", 16, progress=False)
    x = pixel_features(data.images)
    kmeans_nmi = normalized_mutual_info_score(data.labels, self_label(x, 10)[0])
    ids, _ = temi_cluster(x, 10, epochs=40, progress=False)
    temi_nmi = normalized_mutual_info_score(data.labels, ids)
    print(f"digits NMI: TEMI defaults {temi_nmi:.3f}, k-means {kmeans_nmi:.3f}")
    assert temi_nmi > kmeans_nmi


def test_distinct_clusters_counts_duplicates_once():
    """The argmax count C_u when the clusters' columns are orthogonal (hard assignments, any balance,
    unused clusters left out); a group spread evenly over duplicate clusters, each some row's argmax
    by a hair, counts once; soft boundaries barely lower it."""
    assert distinct_clusters(torch.eye(8)[torch.tensor([0, 0, 0, 0, 1, 2, 2, 5])]) == pytest.approx(4.0)
    eps = 1e-3 * torch.tensor([1.0, -1.0]).repeat(15)[:, None]  # rows alternate which duplicate wins
    spread = torch.eye(3).repeat_interleave(2, dim=1).repeat(10, 1) / 2 + eps * torch.tensor([1, -1] * 3)
    assert (spread.argmax(-1).bincount(minlength=6) > 0).all()  # every cluster an argmax: C_u = 6
    assert distinct_clusters(spread) == pytest.approx(3.0, abs=1e-3)
    soft = torch.tensor([[1.0, 0.0]] * 10 + [[0.0, 1.0]] * 10 + [[0.6, 0.4], [0.4, 0.6]])
    assert 1.9 < distinct_clusters(soft) < 2.0


def test_cluster_count_bound_is_plausible_and_tabulated():
    x, _ = _blobs(40, 6)
    lines = []
    bound, table = cluster_count_bound(x, threshold=0.9, c_start=2, c_max=64, epochs=30, cfg=SMALL_TEMI,
                                       progress=False, log=lines.append)
    assert 3 <= bound <= 12, table
    cs = [r["C"] for r in table]
    assert cs == sorted(cs) and cs[:2] == [2, 4] and bound in cs
    for r in table:
        assert r["ratio"] == pytest.approx(r["C_dist"] / r["C"]) and 1 <= r["C_u"] <= r["C"]
        assert 1 <= r["epochs"] <= 30
    assert bound == max(r["C"] for r in table if r["ratio"] >= 0.9)
    assert max(cs) < 64  # the doubling stopped at the first bad C
    assert f"upper bound on the number of clusters: {bound}" in lines[0]


def _search_order(table: list[dict], threshold: float = 0.9) -> list[int]:
    """The C values the search must have run, given their ratios: doubling to the first bad C, then
    upward from the last good doubling step to the first bad C of the grid."""
    ratio, c, order = {r["C"]: r["ratio"] for r in table}, 2, []
    while True:
        order.append(c)
        if ratio[c] < threshold:
            break
        c *= 2
    for g in range(c // 2 + 1, c):
        order.append(g)
        if ratio[g] < threshold:
            break
    return sorted(order)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("n_per,d", [(50, 16), (100, 32)])
def test_cluster_count_bound_on_eight_blobs(n_per, d):
    """TEMIConfig(), 8 separated blobs (all k = 50 neighbours in the blob), threshold 0.9, c_start 2,
    50 epochs with early stopping. Before the distinct count the argmax count gave 64 at 100 a blob
    (every blob split over C / 8 duplicate clusters). Measured (2026-12-04): runs C = 2, 4, 8, 16, 9,
    bound 8 (C = 9: C_dist 8.0 = 0.89 C; C = 16: 7.4-7.5), ~50 / ~60 s of CPU on one thread.
    benchmarks/bench_temi_bound.py runs all six settings (50 / 100 / 200 a blob, d = 16 / 32)."""
    x, _ = _blobs(n_per, 8, d=d, sep=8.0)
    bound, table = cluster_count_bound(x, progress=False, log=lambda _: None)
    assert 8 <= bound <= 16, table
    assert [r["C"] for r in table] == _search_order(table)  # no run past the first bad C
    assert bound == max(r["C"] for r in table if r["ratio"] >= 0.9)


# ------------------------------------------------------------------------------------ STEGO

def _segmented_patches(n=48, h=6, w=6, d=24, k=3, seed=0):
    """Patch features from k prototypes: background 0, one 3x3 object of class 1..k-1 per image."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(k, d, generator=g) * 3
    seg = torch.zeros(n, h, w, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, 3, (2,), generator=g).tolist()
        seg[i, r:r + 3, c:c + 3] = int(torch.randint(1, k, (1,), generator=g))
    return protos[seg.view(n, -1)] + torch.randn(n, h * w, d, generator=g), seg


def test_stego_head_trains_and_masks_are_one_hot():
    patches, seg = _segmented_patches()
    head, losses = train_stego(patches, patches.mean(1), StegoConfig(steps=60, batch_size=16), progress=False)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    segments = segment_codes(codes_of(head, patches), 3)
    assert cluster_report(segments.flatten(), 3, seg.flatten())["nmi"] > 0.9
    layout, multi = segment_masks(segments, (6, 6), 3, 12)
    assert layout.shape == (48, 3, 12, 12) and layout.dtype == torch.uint8
    assert (layout.sum(1) == 1).all()  # one-hot per pixel
    torch.testing.assert_close(multi, layout.amax(dim=(2, 3)).float())
    present = F.one_hot(segments, 3).amax(1).float()  # grid 6 -> 12 px keeps every patch
    torch.testing.assert_close(multi, present)
    up = layout.argmax(1)[:, ::2, ::2]  # nearest upsampling by 2: every other pixel is the grid
    assert torch.equal(up, segments.view(48, 6, 6))


# ------------------------------------------------------------------------------------ features

def test_pixel_extractor_patches_and_pca():
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    out = extract(PixelExtractor(patch=4, pca_dim=3), images, batch_size=2, progress=False)
    assert out["grid"].tolist() == [2, 2] and out["patches"].shape == (5, 4, 16)
    torch.testing.assert_close(out["cls"], pixel_features(images, 3))
    top_left = images[:, 0, :4, :4].flatten(1).float() / 127.5 - 1
    torch.testing.assert_close(out["patches"][:, 0].float(), top_left, atol=1e-3, rtol=1e-3)


def test_extract_cache_is_reused_and_keyed(tmp_path):
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    names = [f"im{i}" for i in range(6)]
    ext = PixelExtractor()
    first = extract(ext, images, 4, progress=False, cache=tmp_path, names=names)
    ext.forward = None  # a cache hit must not run the extractor
    again = extract(ext, images, 4, progress=False, cache=tmp_path, names=names)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(TypeError):  # other names: another key, so the extractor runs (and fails here)
        extract(ext, images, 4, progress=False, cache=tmp_path, names=names[::-1])
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1


@needs_timm
def test_vit_extractor_reads_dino_checkpoint_layout(tmp_path):
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    plain, dino = tmp_path / "plain.pth", tmp_path / "dino.pth"
    torch.save(net.state_dict(), plain)
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in net.state_dict().items()}}, dino)
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    a = ViTExtractor("vit_tiny_patch16_224", plain, img_size=32)(images)
    b = ViTExtractor("vit_tiny_patch16_224", dino, img_size=32)(images)
    assert a["cls"].shape == (3, 192) and a["patches"].shape == a["keys"].shape == (3, 4, 192)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the keys are the k third of the last block's qkv on its normed input, CLS dropped
    ext, seen = ViTExtractor("vit_tiny_patch16_224", plain, img_size=32), {}
    ext.model.blocks[-1].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    keys = ext(images)["keys"]
    blk = ext.model.blocks[-1]
    torch.testing.assert_close(keys, blk.attn.qkv(blk.norm1(seen["x"]))[:, 1:, 192:384])


@needs_timm
def test_wrong_or_corrupt_vit_weights_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        ViTExtractor("vit_tiny_patch16_224", bad, img_size=32)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1).state_dict(), other)
    with pytest.raises(ValueError, match="lack .* tensors"):
        ViTExtractor("vit_tiny_patch16_224", other, img_size=32)


def _tiny_run(tmp_path):
    from sgengine.config import PRESETS, to_dict
    from sgengine.checkpoint import save_checkpoint
    from sgengine.diffusion.objectives import build_network, make_objective

    cfg = PRESETS["tiny"]
    net = make_objective(cfg).wrap(build_network(cfg))
    save_checkpoint(tmp_path / "run", 0, net, net, {}, {"config": to_dict(cfg)})
    return tmp_path / "run"


def test_diffusion_extractor_features(tmp_path):
    run = _tiny_run(tmp_path)
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    ext = DiffusionExtractor(run, "mid", t=100)
    a = extract(ext, images, 3, progress=False)
    b = extract(ext, images, 7, progress=False)  # per-image noise: batching does not matter
    torch.testing.assert_close(a["cls"], b["cls"], atol=1e-5, rtol=1e-5)
    assert a["cls"].shape == (7, 32) and a["patches"].shape == (7, 16, 32) and a["grid"].tolist() == [4, 4]
    torch.testing.assert_close(a["cls"], a["patches"].float().mean(1), atol=1e-2, rtol=1e-2)
    later = extract(DiffusionExtractor(run, "mid", t=900), images, 7, progress=False)
    assert not torch.allclose(a["cls"], later["cls"], atol=1e-3)
    by_index = extract(DiffusionExtractor(run, len(ext.raw.down), t=100), images, 7, progress=False)
    torch.testing.assert_close(a["cls"], by_index["cls"])  # 'mid' is the block after the down levels
    with pytest.raises(ValueError, match="does not fit objective"):
        DiffusionExtractor(run, "mid", t=1000)


# ------------------------------------------------------------------------------------ CLI

def _check_file(path, method, k=10):
    ann = load_annotations(path)
    assert len(ann) == 1797 and ann.k == k and ann.settings["method"] == method
    if method == "boxes":
        assert ann.layout.shape == (1797, 1, 16, 16) and set(ann.layout.unique().tolist()) <= {0, 1}
    if method == "segments":
        assert ann.layout.shape == (1797, k, 16, 16) and (ann.layout.sum(1) == 1).all()
        torch.testing.assert_close(ann.cond, ann.layout.amax(dim=(2, 3)).float())
    return ann


@pytest.mark.parametrize("method", ["labels", "boxes", "segments"])
def test_cli_pixels_on_digits(tmp_path, method, capsys):
    out, png = tmp_path / "ann.safetensors", tmp_path / "ann.png"
    rc = main(["--data", "digits", "--size", "16", "--method", method, "--extractor", "pixels", "--k", "10",
               "--out", str(out), "--inspect", str(png), "--steps", "40", "--quiet"])
    assert rc == 0
    ann = _check_file(out, method)
    printed = capsys.readouterr().out
    assert "NMI" in printed and "utilisation" in printed and "KL to uniform" in printed
    assert 0 <= ann.settings["report"]["nmi"] <= 1 + 1e-9
    with Image.open(png) as im:
        assert im.width > 64 and im.height > 64


def _register_tiny_vit() -> str:
    """A custom tiny ViT in timm's registry (2 blocks, 8-pixel patches at 32: a 4x4 grid)."""
    name = "vit_sgengine_test_tiny"
    if not timm.is_model(name):
        from timm.models import register_model
        from timm.models.vision_transformer import VisionTransformer

        def vit_sgengine_test_tiny(pretrained=False, **kw):
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kw.pop(key, None)
            return VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2), **kw})
        register_model(vit_sgengine_test_tiny)
    return name


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """(timm name, a .safetensors file of its random state dict)."""
    from safetensors.torch import save_file

    name = _register_tiny_vit()
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(name, num_classes=0).state_dict().items()}, str(path))
    return name, path


@needs_timm
def test_cli_random_vit_on_digits(tmp_path, tiny_vit, capsys):
    name, weights = tiny_vit
    for method in ("labels", "boxes", "segments"):
        out = tmp_path / f"{method}.safetensors"
        rc = main(["--data", "digits", "--size", "16", "--method", method, "--extractor", name,
                   "--weights", str(weights), "--img_size", "32", "--k", "10", "--out", str(out),
                   "--steps", "20", "--batch_size", "512", "--quiet"])
        assert rc == 0, capsys.readouterr().err
        ann = _check_file(out, method)
        assert ann.settings["features"]["extractor"] == name
    assert len(list((tmp_path / "feature-cache").glob("features-*.safetensors"))) == 3


@needs_timm
def test_random_vit_is_seeded_and_keyed_by_its_seed(tmp_path, tiny_vit):
    from sgengine.annotate.features import ViTExtractor, cache_key
    name, _ = tiny_vit
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    a, b, c = (ViTExtractor(name, "random", seed=s) for s in (1, 1, 2))
    assert torch.equal(a(images)["cls"], b(images)["cls"])
    assert not torch.allclose(a(images)["cls"], c(images)["cls"])
    assert cache_key(a, images, None, ("cls",)) == cache_key(b, images, None, ("cls",))
    assert cache_key(a, images, None, ("cls",)) != cache_key(c, images, None, ("cls",))
    from sgengine.annotate.__main__ import build_parser
    help_text = " ".join(build_parser().format_help().split())
    assert "'random' for a random init seeded by --seed" in help_text and "feature-cache key" in help_text


@needs_timm
def test_cli_corrupt_weights_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00garbage")
    rc = main(["--data", "digits", "--size", "16", "--extractor", "vit_tiny_patch16_224", "--weights", str(bad),
               "--k", "10", "--out", str(tmp_path / "a.safetensors"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read weights file" in err and "broken.pth" in err
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_rejects_boxes_from_diffusion_features(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    rc = main(["--data", "digits", "--size", "8", "--channels", "1", "--method", "boxes", "--extractor",
               f"diffusion:{run}", "--k", "4", "--out", str(tmp_path / "a.safetensors"), "--quiet"])
    assert rc == 2 and "LOST boxes need a ViT" in capsys.readouterr().err
