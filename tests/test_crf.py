"""Dense-CRF refinement of segments (sgengine/annotate/crf.py) and its use by the annotate CLI."""
import pytest
import torch

from sgengine.annotate import crf
from sgengine.annotate.__main__ import main
from sgengine.annotate.crf import CRFConfig, dense_crf, refine_segments
from sgengine.annotate.io import load_annotations

pytestmark = pytest.mark.usefixtures("one_thread")


def _written_out(image, probs, cfg):
    """Krähenbühl & Koltun's mean-field update with the full N x N kernels, by broadcasting."""
    k, h, w = probs.shape
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    p = torch.stack([ys.flatten(), xs.flatten()], 1)
    rgb = image.reshape(image.shape[0], -1).T.double()
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    c2 = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    kernels = [(cfg.pos_w, torch.exp(-d2 / (2 * cfg.pos_xy_std ** 2))),
               (cfg.bi_w, torch.exp(-d2 / (2 * cfg.bi_xy_std ** 2) - c2 / (2 * cfg.bi_rgb_std ** 2)))]
    unary = -probs.reshape(k, -1).T.double().clamp(min=1e-5).log()
    q = torch.softmax(-unary, 1)
    for _ in range(cfg.iters):
        msg = 0
        for wt, kern in kernels:
            norm = kern.sum(1, keepdim=True).rsqrt()  # symmetric normalisation D^-1/2 K D^-1/2
            msg = msg + wt * norm * (kern @ (norm * q))
        q = torch.softmax(-unary + msg, 1)
    return q.T.reshape(k, h, w).float()


@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("c,h,w,k,block", [(3, 9, 7, 4, 2048), (1, 13, 11, 3, 17), (3, 6, 6, 2, 5)])
def test_dense_crf_equals_the_written_out_update(c, h, w, k, block, held, monkeypatch):
    if not held:  # no kernel fits: rebuilt in row blocks every iteration
        monkeypatch.setattr(crf, "KERNEL_ENTRIES", 0)
    g = torch.Generator().manual_seed(h * w)
    image = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
    probs = torch.softmax(torch.randn(k, h, w, generator=g) * 2, 0)
    cfg = CRFConfig(iters=5, bi_xy_std=4.0, bi_rgb_std=40.0, block=block)
    got = dense_crf(image, probs, cfg)
    torch.testing.assert_close(got, _written_out(image, probs, cfg), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sum(0), torch.ones(h, w))


def test_crf_cleans_noisy_labels_along_an_edge():
    """Two flat regions; 25% of pixels get confidently wrong probabilities: the CRF restores most."""
    h = w = 24
    truth = (torch.arange(w) >= 10).long().expand(h, w)
    image = (truth * 200 + 20).to(torch.uint8)[None].expand(3, h, w)
    g = torch.Generator().manual_seed(0)
    noisy = torch.where(torch.rand(h, w, generator=g) < 0.25, 1 - truth, truth)
    probs = torch.nn.functional.one_hot(noisy, 2).permute(2, 0, 1).float() * 0.4 + 0.3  # 0.7 / 0.3
    refined = refine_segments(image[None], probs[None], CRFConfig(bi_xy_std=8.0, bi_rgb_std=10.0))[0]
    assert (noisy == truth).float().mean() < 0.8
    assert (refined == truth).float().mean() > 0.98


def test_crf_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="upsample the probabilities"):
        dense_crf(torch.zeros(3, 8, 8), torch.ones(2, 4, 4) / 2)
    with pytest.raises(ValueError, match="finite and non-negative"):
        dense_crf(torch.zeros(3, 4, 4), torch.full((2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="2 images but 1"):
        refine_segments(torch.zeros(2, 3, 4, 4), torch.ones(1, 2, 4, 4))


def test_cli_segments_with_crf_on_digits(tmp_path, capsys):
    out = tmp_path / "seg.safetensors"
    args = ["--data", "digits", "--size", "8", "--method", "segments", "--extractor", "pixels", "--k", "5",
            "--out", str(out), "--steps", "20", "--quiet", "--crf", "--crf_iters", "3"]
    assert main(args) == 0
    ann = load_annotations(out)
    assert ann.layout.shape == (1797, 5, 8, 8) and (ann.layout.sum(1) == 1).all()
    assert ann.settings["crf"]["iters"] == 3
    torch.testing.assert_close(ann.cond, ann.layout.amax(dim=(2, 3)).float())
    # Pixel-level segments: unlike the nearest-upsampled 2x2 patch grid, not constant on 4x4 cells.
    cells = ann.layout.argmax(1).view(1797, 2, 4, 2, 4)
    assert (cells.amin(dim=(2, 4)) != cells.amax(dim=(2, 4))).any()
    assert main(["--data", "digits", "--method", "labels", "--k", "5", "--out", str(out), "--crf"]) == 2
    assert "--method segments" in capsys.readouterr().err
