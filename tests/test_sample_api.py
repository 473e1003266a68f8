"""The embeddable API: outside models through Generator.of, layer discovery, EMA, checked grids, and
every (sampler, objective) pair from ``python -m sgengine.sample``."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sgengine as sg
from sgengine.config import preset
from sgengine.diffusion import SAMPLERS
from sgengine.guidance.attach import core_network
from sgengine.models.unet import UNET_PRESETS
from sgengine.sample import main as sample_main
from sgengine.training.ema import ema_update
from sgengine.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


def _unet(k=K):
    torch.manual_seed(0)
    net = sg.UNet(dataclasses.replace(UNET_PRESETS["tiny"], num_classes=k)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


# --- save_grid: dtype and range -------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda u: u, lambda u: u.float() / 127.5 - 1, lambda u: u.float() / 255])
def test_save_grid_draws_uint8_and_both_float_ranges_alike(tmp_path, make):
    u = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    png = sg.save_grid(make(u), 2, tmp_path / "g.png")
    want = np.asarray(Image.open(sg.save_grid(u, 2, tmp_path / "u.png")))
    assert np.abs(np.asarray(Image.open(png)).astype(int) - want).max() <= 1


@pytest.mark.parametrize("images,match", [(torch.rand(2, 1, 4, 4) * 255, "value_range"),
                                          (torch.ones(2, 1, 4, 4, dtype=torch.int64), "uint8 or floating"),
                                          (torch.full((2, 1, 4, 4), float("nan")), "NaN"),
                                          (torch.rand(2, 4, 4), r"\(N, C, H, W\)")])
def test_save_grid_rejects_what_it_would_draw_wrong(tmp_path, images, match):
    with pytest.raises(ValueError, match=match):
        sg.save_grid(images, 1, tmp_path / "g.png")
    sg.save_grid(torch.rand(2, 1, 4, 4) * 255, 1, tmp_path / "ok.png", value_range=(0, 255))


# --- attention-layer discovery through the declared protocol ---------------------------------------

class KDiffusionStyle(nn.Module):
    """A k-diffusion-style wrapper: the network is ``inner_model``, no parameters of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner_model = inner

    def forward(self, x, t, **cond):
        return self.inner_model(x, t, **cond)


class Declared(nn.Module):
    """A wrapper with parameters of its own that declares where its attention layers are."""

    def __init__(self, inner):
        super().__init__()
        self.backbone, self.head = inner, nn.Conv2d(1, 1, 1)

    def forward(self, x, t, **cond):
        return self.head(self.backbone(x, t, **cond))

    def attention_network(self):
        return self.backbone


@pytest.mark.parametrize("wrap", [KDiffusionStyle, Declared, lambda n: sg.CFG(n, 2.0), lambda n: n])
def test_layers_are_found_through_wrappers(wrap):
    net = _unet()
    wrapped = wrap(net)
    assert core_network(wrapped) is net
    assert "mid.1.attn" in sg.list_attention_layers(wrapped)
    with sg.capture_key_mass(wrapped, "mid.1.attn") as cap:
        net(torch.randn(2, 1, 8, 8), torch.full((2,), 10.0))
    assert cap.mass.shape == (2, 4, 4)


def test_api_errors_name_the_fix_and_no_cli_flag():
    with pytest.raises(TypeError, match="attention_network") as err:
        sg.list_attention_layers(lambda x, t: x)
    assert "--" not in str(err.value)
    with pytest.raises(KeyError) as err:
        sg.capture_key_mass(_unet(), "nope")
    assert "mid.1.attn" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(TypeError, match="not a supported attention family; supported: engine.*unet"):
        sg.capture_key_mass(nn.Sequential(nn.Linear(2, 2)), "0")


# --- EMA ---------------------------------------------------------------------------------------

def test_ema_follows_the_warm_up_rule_and_checks_its_decay():
    net = nn.Linear(3, 3)
    ema, ref = sg.EMA(net, max_decay=0.99), nn.Linear(3, 3)
    ref.load_state_dict(net.state_dict())
    for n in range(5):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema_update(ref, net, min(0.99, (1 + n) / (10 + n)))
        ema.update(net)
    torch.testing.assert_close(ema.module.weight, ref.weight)
    assert not torch.equal(ema.module.weight, net.weight) and not ema.module.weight.requires_grad
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sg.EMA(net, max_decay=1.5)


# --- sg.sample on outside models ---------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generator_of_an_outside_network_samples_with_every_sampler_under_cfg_and_sag(sampler):
    gen = sg.Generator.of(_unet(), "ddpm", (1, 8, 8), num_classes=K, class_ids=False, clip_x0=True)
    ids = torch.tensor([0, 2])
    x = sg.sample(gen, ids, w=2.0, steps=3, sampler=sampler, sag_scale=0.5, sag_blur=(3, 1.0))
    plain = sg.sample(gen, ids, w=2.0, steps=3, sampler=sampler)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1 + 1e-6 and not torch.allclose(x, plain)


def test_cfg_takes_integer_class_ids_on_a_diffusers_class_conditional_unet():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=K + 1).eval()
    net = sg.DiffusersDenoiser(unet, null_label=K)
    ids, x, t = torch.tensor([0, 2]), torch.randn(2, 1, 8, 8), torch.full((2,), 500.0)
    with torch.no_grad():
        got = sg.CFG(net, 2.0, y=ids)(x, t)
        u, c = unet(x, t, class_labels=torch.full((2,), K)).sample, unet(x, t, class_labels=ids).sample
    torch.testing.assert_close(got, u + 2.0 * (c - u), rtol=1e-4, atol=1e-5)
    gen = sg.Generator.of(net, sg.parameterization_for("ddpm"), (1, 8, 8), num_classes=K)
    assert sg.sample(gen, ids, steps=2, sampler="heun", sag_scale=0.5, sag_blur=(3, 1.0)).shape == (2, 1, 8, 8)


def test_generator_of_checks_its_arguments():
    with pytest.raises(ValueError, match="channels, height, width"):
        sg.Generator.of(_unet(), "edm", (8, 8))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sg.sample(sg.Generator.of(_unet(), "edm", (1, 8, 8), num_classes=K), torch.tensor([5]), steps=1)


# --- every (sampler, objective) pair from the CLI --------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for objective in ("ddpm", "edm", "flow"):
        run = tmp_path_factory.mktemp(objective) / "run"
        cfg = dataclasses.replace(preset("tiny"), out=str(run), condition="labels", objective=objective,
                                  steps=2, ckpt_every=2, sample_steps=2, log_every=1)
        Trainer(cfg).run()
        out[objective] = run
    return out


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_cli_samples_every_objective_with_every_sampler(runs, objective, tmp_path):
    got = {}
    for sampler in sorted(SAMPLERS):
        png = tmp_path / f"{sampler}.png"
        assert sample_main(["--ckpt", str(runs[objective]), "--n", "4", "--clusters", "0", "1", "--steps", "3",
                            "--sampler", sampler, "--out", str(png)]) == 0
        got[sampler] = np.load(png.with_suffix(".npz"))["images"]
        assert got[sampler].shape == (4, 1, 8, 8) and png.exists()
    assert not np.array_equal(got["euler"], got["heun"])  # the sampler is really the one named


def test_readme_sag_example_on_a_text_conditional_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    from sgengine.diffusion import sample

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, attention_head_dim=4, layers_per_block=1).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    context, empty = torch.randn(2, 5, 6), torch.zeros(5, 6)
    net = sg.DiffusersDenoiser(unet, null_context=empty)
    param = sg.eps_param(scheduler.alphas_cumprod)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert layer in sg.list_attention_layers(net)
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        with sg.SAG(net, param, layer, scale=0.75, w=7.5, y=context) as guided:
            x = sample(param, guided, noise, 3, sampler="ddim")
        plain = sample(param, sg.CFG(net, 7.5, y=context), noise, 3, sampler="ddim")
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and not torch.allclose(x, plain)
