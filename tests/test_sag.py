"""Self-attention guidance: parameterisations, key-mass capture, the SAG denoiser, the CLI."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sgtest import tiny_online_run
from torchvision.transforms.functional import gaussian_blur

from sgengine.config import preset
from sgengine.diffusion.flow import SIGMA_MIN
from sgengine.guidance import CFG, SAG, capture_key_mass, list_attention_layers, parameterization_for
from sgengine.guidance.attach import core_network
from sgengine.kernels.sag_degrade import sag_degrade
from sgengine.models.attention import attention
from sgengine.models.unet import UNET_PRESETS
from sgengine.models.uvit import UVIT_PRESETS, UViT
from sgengine.sample import main as sample_main
from sgengine.diffusion.objectives import build_network, make_objective, run_sampler
from sgengine.training.trainer import Trainer

OBJECTIVES = ("ddpm", "edm", "flow")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops
T_OF = {"ddpm": 500.0, "edm": 2.0, "flow": 0.5}  # one mid-trajectory time per objective
K = 4


def _model(objective, attention_ds=(1, 2)):
    """A conditional tiny UNet (with an 8x8 high-resolution attention layer) and random weights:
    the zero-initialised output layers would otherwise make every prediction 0."""
    model = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=K, attention_ds=attention_ds)
    cfg = dataclasses.replace(preset("tiny"), objective=objective, condition="labels", model=model)
    return cfg, _randomise(make_objective(cfg).wrap(build_network(cfg)).eval())


def _randomise(net):
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


def _inputs(objective, b=3):
    y = F.one_hot(torch.arange(b) % K, K).float()
    return torch.randn(b, 1, 8, 8), torch.full((b,), T_OF[objective]), y


# --- re-noising per parameterisation -------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_zero_mask_returns_x_t_for_every_parameterisation(objective):
    cfg = preset("tiny")
    param = parameterization_for(objective, cfg)
    x, t, _ = _inputs(objective, b=4)
    t = t * torch.tensor([0.3, 0.6, 1.0, 1.2]).clamp(max=1.0 if objective == "flow" else 2.0)
    x0, eps = param.x0_eps(x, torch.randn_like(x), t)
    a, b = param.coeffs(t)
    mass = torch.rand(4, 4, 4) * 2
    x_deg = sag_degrade(x, x0, eps, mass, a, b, threshold=float("inf"), kernel_size=5, sigma=1.0)
    torch.testing.assert_close(x_deg, x, rtol=1e-5, atol=1e-5)


def test_parameterization_needs_no_config_and_names_the_choices():
    cfg = preset("tiny")
    t = torch.tensor([3.0, 500.0, 999.0])
    torch.testing.assert_close(parameterization_for("ddpm").coeffs(t), parameterization_for("ddpm", cfg).coeffs(t))
    with pytest.raises(ValueError, match="'ddpm', 'v', 'edm' or 'flow'"):
        parameterization_for("vp")


# --- key-mass capture ----------------------------------------------------------------------------

def _materialise(module, store):
    """Swap ``module.attend`` for explicit softmax attention, keeping every map in ``store``."""
    def attend(q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        store.append(a)
        return a @ v
    module.attend = attend


def _module(net, layer):
    return dict(core_network(net).named_modules())[layer]


@pytest.mark.parametrize("layer,side", [("mid.1.attn", 4), ("up.2.1.attn", 8), ("down.0.1.attn", 8)])
def test_captured_mass_matches_the_map_and_averages_to_one(layer, side):
    _, net = _model("ddpm")
    x, t, y = _inputs("ddpm")
    with torch.no_grad(), capture_key_mass(net, layer) as cap:
        out = net(x, t, y=y)
        mass = cap.mass
    store = []
    _materialise(_module(net, layer), store)
    with torch.no_grad():
        want = net(x, t, y=y)
    assert mass.shape == (3, side, side)
    torch.testing.assert_close(mass.mean(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(mass.flatten(1), store[0].sum(2).mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    _module(net, layer).attend = attention


def test_capture_restores_the_hook():
    _, net = _model("ddpm")
    with capture_key_mass(net, "mid.1.attn"):
        assert _module(net, "mid.1.attn").attend is not attention
    assert _module(net, "mid.1.attn").attend is attention


def test_uvit_mass_drops_the_extra_tokens():
    net = UViT(UVIT_PRESETS["uvit-tiny"]).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert "mid_block.attn" in list_attention_layers(net)
    with torch.no_grad(), capture_key_mass(net, "mid_block.attn") as cap:
        net(x, t)
    store = []
    _materialise(net.mid_block.attn, store)
    with torch.no_grad():
        net(x, t)
    assert cap.mass.shape == (2, 4, 4)  # 8x8 image, patch 2: a 4x4 grid without time/cond/CLS
    # image queries only (rows 3:) at image keys only (columns 3:): the extras are neither counted nor kept
    torch.testing.assert_close(cap.mass.flatten(1), store[0][:, :, 3:].sum(2).mean(1)[:, 3:], rtol=1e-4, atol=1e-5)


def test_wrong_layer_name_lists_the_layers():
    _, net = _model("edm")
    with pytest.raises(KeyError, match="mid.1.attn.*up.2.1.attn"):
        capture_key_mass(net, "mid.attn")


# --- the SAG denoiser ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_scale_zero_reproduces_the_unguided_sampler_exactly(objective):
    cfg, net = _model(objective)
    obj = make_objective(cfg)
    x, _, y = _inputs(objective)
    count = _Counter(net)
    want = run_sampler(obj, None, CFG(net, 2.0, y=y), x, 2)
    forwards, count.n = count.n, 0
    with SAG(net, parameterization_for(objective, cfg), "mid.1.attn", scale=0.0, w=2.0, y=y) as sag:
        got = run_sampler(obj, None, sag, x, 2)
    assert torch.equal(got, want) and count.n == forwards  # and no extra forward


def _to_eps(objective, x, pred, t):
    """eps from the native prediction at input x (written out, independent of param.py)."""
    t = t.view(-1, 1, 1, 1)
    return {"ddpm": pred, "edm": (x - pred) / t, "flow": x - t * pred}[objective]


def _from_eps(objective, x, eps, t):
    t = t.view(-1, 1, 1, 1)
    return {"ddpm": eps, "edm": x - t * eps, "flow": (x - eps) / t}[objective]


def _ab(objective, cfg, t):
    if objective == "ddpm":
        abar = torch.cumprod(1 - torch.linspace(cfg.beta_start, cfg.beta_end, cfg.T, dtype=torch.float64), 0)
        ab = abar[t.long()].float()
        return ab.sqrt(), (1 - ab).sqrt()
    if objective == "edm":
        return torch.ones_like(t), t
    return t, 1 - (1 - SIGMA_MIN) * t


def _reference(objective, cfg, net, layer, x, t, y, w, s, blur, threshold=1.0, extras=0):
    """SAG + CFG with separate forwards, the materialised map and torchvision's blur, in eps;
    ``extras``: leading non-image tokens (the U-ViT's time, condition, CLS): not counted, not kept."""
    store = []
    _materialise(_module(net, layer), store)
    yes, no = torch.ones(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.bool)
    pred_u, pred_c = net(x, t, y=y, null=yes), net(x, t, y=y, null=no)
    mass = store[0][:, :, extras:].sum(2).mean(1)[:, extras:]  # image queries, image keys
    mass = mass / mass.mean(dim=1, keepdim=True)  # above average among the image keys
    side = int(mass.shape[1] ** 0.5)
    m = F.interpolate((mass.view(len(x), 1, side, side) > threshold).float(), size=x.shape[-2:], mode="nearest")
    assert 0 < m.mean() < 1  # a mask that is neither empty nor full
    a, b = (c.view(-1, 1, 1, 1) for c in _ab(objective, cfg, t))
    eps_u, eps_c = _to_eps(objective, x, pred_u, t), _to_eps(objective, x, pred_c, t)
    x0 = (x - b * eps_u) / a
    x0_bar = m * gaussian_blur(x0, [blur[0]] * 2, [blur[1]] * 2) + (1 - m) * x0
    x_deg = a * x0_bar + b * eps_u
    eps_deg = _to_eps(objective, x_deg, net(x_deg, t, y=y, null=yes), t)
    _module(net, layer).attend = attention
    return _from_eps(objective, x, eps_u + w * (eps_c - eps_u) + s * (eps_u - eps_deg), t)


@pytest.mark.parametrize("layer", ["mid.1.attn", "up.2.1.attn"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sag_with_cfg_equals_the_reference_formula(objective, layer):
    cfg, net = _model(objective)
    x, t, y = _inputs(objective)
    with torch.no_grad():
        with SAG(net, parameterization_for(objective, cfg), layer, scale=0.8, blur=(5, 1.0), w=2.0, y=y) as sag:
            got = sag(x, t)
        want = _reference(objective, cfg, net, layer, x, t, y, 2.0, 0.8, (5, 1.0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sag_with_cfg_on_the_uvit_equals_the_reference_formula():
    cfg = SimpleNamespace(objective="flow", arch="uvit", uvit=UVIT_PRESETS["uvit-tiny"])  # make_objective duck-types
    net = _randomise(make_objective(cfg).wrap(build_network(cfg)).eval())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.6)
    y = torch.randn(2, net.cfg.condition_dim)
    with torch.no_grad():
        with SAG(net, parameterization_for("flow"), "mid_block.attn", scale=0.8, threshold=1.0,
                 blur=(3, 1.0), w=2.0, y=y) as sag:
            got = sag(x, t)
        want = _reference("flow", cfg, net, "mid_block.attn", x, t, y, 2.0, 0.8, (3, 1.0), 1.0, extras=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sag_without_cfg_is_eq_17(objective):
    """No CFG: Eq. 17 on eps, pred_deg + (1 + s)(pred - pred_deg), with the degraded input rebuilt by
    the reference (materialised map, torchvision blur), not by SAG's own ``degrade``."""
    cfg, net = _model(objective)
    x, t, _ = _inputs(objective)
    with torch.no_grad():
        with SAG(net, parameterization_for(objective, cfg), "mid.1.attn", scale=0.5, blur=(5, 1.0)) as sag:
            got = sag(x, t)
        want = _reference(objective, cfg, net, "mid.1.attn", x, t, None, 0.0, 0.5, (5, 1.0))
        plain = net(x, t)
    assert not torch.allclose(got, plain, atol=1e-3)  # the guidance term is not zero
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Counter:
    """Samples seen by the core network's forward."""

    def __init__(self, net):
        self.n = 0
        core_network(net).register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.n += args[0].shape[0]


@pytest.mark.parametrize("objective", ["ddpm", "edm"])
def test_extra_forward_is_b_inside_the_window_and_0_outside(objective):
    cfg, net = _model(objective)
    x, t, y = _inputs(objective)
    window = (0.5 * T_OF[objective], 1.5 * T_OF[objective])
    count = _Counter(net)
    with torch.no_grad(), SAG(net, parameterization_for(objective, cfg), "mid.1.attn", w=2.0,
                              window=window, y=y) as sag:
        for tt, extra in ((t, 3), (t * 3, 0), (t * 0.2, 0)):
            count.n = 0
            out = sag(x, tt)
            assert count.n == 2 * 3 + extra
            if not extra:
                assert torch.equal(out, CFG(net, 2.0, y=y)(x, tt))


def test_bad_arguments_name_the_fix():
    cfg, net = _model("ddpm")
    param = parameterization_for("ddpm", cfg)
    with pytest.raises(ValueError, match="odd kernel_size"):
        SAG(net, param, "mid.1.attn", blur=(4, 1.0))
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        SAG(net, param, "mid.1.attn", window=(5, 1))
    with pytest.raises(ValueError, match="needs a condition"):
        SAG(net, param, "mid.1.attn", w=2.0)


# --- diffusers -----------------------------------------------------------------------------------

def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")


def _diffusers_unet(conditional: bool):
    """A small randomly initialised diffusers UNet with an 8x8 and a 4x4 self-attention level."""
    diffusers = _diffusers()
    torch.manual_seed(0)
    if not conditional:
        return _randomise(diffusers.UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
            attention_head_dim=4, layers_per_block=1).eval())
    return _randomise(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, attention_head_dim=4, layers_per_block=1).eval())


def test_diffusers_processor_reads_the_mass_and_keeps_the_output():
    unet = _diffusers_unet(conditional=False)
    layers = list_attention_layers(unet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        want = unet(x, t).sample
        cap = capture_key_mass(unet, "mid_block.attentions.0")
        got = unet(x, t).sample
        cap.close()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cap.mass.shape == (2, 4, 4)
    torch.testing.assert_close(cap.mass.mean(dim=(1, 2)), torch.ones(2))
    with pytest.raises(KeyError, match=layers[0]):
        capture_key_mass(unet, "nope")


def _diffusers_materialise(unet, layer, store):
    """diffusers' own non-SDPA processor on ``layer``, keeping every probability map in ``store``."""
    from diffusers.models.attention_processor import AttnProcessor
    module = dict(unet.named_modules())[layer]
    original, scores = module.processor, module.get_attention_scores

    def record(*args, **kwargs):
        probs = scores(*args, **kwargs)  # (B * heads, Nq, Nk)
        store.append(probs.view(-1, module.heads, *probs.shape[-2:]))
        return probs
    module.set_processor(AttnProcessor())
    module.get_attention_scores = record
    return lambda: (module.set_processor(original), delattr(module, "get_attention_scores"))


@pytest.mark.parametrize("layer", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                                   "up_blocks.1.attentions.0.transformer_blocks.0.attn1"])
def test_sag_with_cfg_on_a_diffusers_unet_equals_the_reference_formula(layer):
    from sgengine.guidance import DiffusersDenoiser, eps_param
    unet, cfg = _diffusers_unet(conditional=True), preset("tiny")
    net = DiffusersDenoiser(unet, null_context=torch.zeros(3, 6))
    assert layer in list_attention_layers(net)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0)
    context = torch.randn(2, 3, 6)
    param = eps_param(torch.cumprod(1 - torch.linspace(cfg.beta_start, cfg.beta_end, cfg.T, dtype=torch.float64), 0))
    with torch.no_grad():
        with SAG(net, param, layer, scale=0.8, blur=(5, 1.0), w=2.0, y=context) as sag:
            got = sag(x, t)
        store = []
        restore = _diffusers_materialise(unet, layer, store)
        want = _reference_eps(cfg, net, store, x, t, context, 2.0, 0.8, (5, 1.0))
        restore()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _reference_eps(cfg, net, store, x, t, y, w, s, blur):
    """SAG + CFG in eps with separate forwards; ``store`` fills with the layer's maps."""
    yes, no = torch.ones(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.bool)
    eps_u = net(x, t, y=y, null=yes)
    mass = store[0].sum(2).mean(1)
    eps_c = net(x, t, y=y, null=no)
    side = int(mass.shape[1] ** 0.5)
    m = F.interpolate((mass.view(len(x), 1, side, side) > 1.0).float(), size=x.shape[-2:], mode="nearest")
    assert 0 < m.mean() < 1
    a, b = (c.view(-1, 1, 1, 1) for c in _ab("ddpm", cfg, t))
    x0 = (x - b * eps_u) / a
    x_deg = a * (m * gaussian_blur(x0, [blur[0]] * 2, [blur[1]] * 2) + (1 - m) * x0) + b * eps_u
    return eps_u + w * (eps_c - eps_u) + s * (eps_u - net(x_deg, t, y=y, null=yes))


def _sag_pipeline_code():
    """``StableDiffusionSAGPipeline``'s own SAG code, taken verbatim from the installed diffusers:
    the module imports transformers (CLIP) at the top, which this math never touches, so only
    ``CrossAttnStoreProcessor``, ``sag_masking``, ``pred_x0``, ``pred_epsilon`` and
    ``gaussian_blur_2d`` are compiled from its source."""
    import ast
    import importlib.util
    from types import SimpleNamespace
    _diffusers()
    spec = importlib.util.find_spec("diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag")
    tree = ast.parse(open(spec.origin).read())
    keep = {"CrossAttnStoreProcessor", "StableDiffusionSAGPipeline", "gaussian_blur_2d"}
    methods = {"sag_masking", "pred_x0", "pred_epsilon"}
    nodes = [n for n in tree.body if getattr(n, "name", None) in keep]
    for n in nodes:
        if n.name == "StableDiffusionSAGPipeline":
            n.bases, n.keywords = [], []
            n.body = [m for m in n.body if getattr(m, "name", None) in methods]
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(nodes, type_ignores=[]), spec.origin, "exec"), namespace)
    return SimpleNamespace(**{k: namespace[k] for k in keep})


def _sag_pipeline_eps(unet, scheduler, latents, t, emb_u, emb_c, w, s):
    """One step of diffusers' ``StableDiffusionSAGPipeline.__call__`` loop (its store processor on
    the mid block, its map-size hook, its ``pred_x0`` / ``pred_epsilon`` / ``sag_masking``);
    ``emb_c`` None: the branch without CFG (SAG on the conditional pass with ``emb_u``)."""
    code = _sag_pipeline_code()
    pipe, store, map_size = code.StableDiffusionSAGPipeline(), code.CrossAttnStoreProcessor(), []
    pipe.unet, pipe.scheduler = unet, scheduler
    originals = unet.attn_processors
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor = store
    hook = unet.mid_block.attentions[0].register_forward_hook(lambda m, i, o: map_size.append(o[0].shape[-2:]))
    try:
        if emb_c is None:
            eps = unet(latents, t, encoder_hidden_states=emb_u).sample
            attn, eps_sag, emb_deg = store.attention_probs, eps, emb_u
        else:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([emb_u, emb_c])).sample.chunk(2)
            eps, attn, eps_sag, emb_deg = eps_u + w * (eps_c - eps_u), store.attention_probs.chunk(2)[0], eps_u, emb_u
        degraded = pipe.sag_masking(pipe.pred_x0(latents, eps_sag, t), attn, map_size[0], t,
                                    pipe.pred_epsilon(latents, eps_sag, t))
        return eps + s * (eps_sag - unet(degraded, t, encoder_hidden_states=emb_deg).sample)
    finally:
        hook.remove()
        unet.set_attn_processor(originals)


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
@pytest.mark.parametrize("hw", [(16, 16), (16, 24), (16, 64)])
def test_sag_on_a_diffusers_unet_equals_diffusers_sag_pipeline_at_every_aspect_ratio(hw, cfg_scale):
    """The mid block's tokens are flattened (B, h*w, C): the grid comes from the enclosing
    Transformer2DModel's 4-D input, so 3:2 and 1:4 latents give diffusers' mask exactly."""
    from diffusers import DDIMScheduler

    from sgengine.guidance import DiffusersDenoiser, eps_param
    torch.manual_seed(1)
    unet, scheduler = _diffusers_unet(conditional=True), DDIMScheduler(beta_schedule="scaled_linear")
    latents, t = torch.randn(2, 1, *hw), 400
    emb_u, emb_c = torch.randn(1, 3, 6), torch.randn(2, 3, 6)
    net = DiffusersDenoiser(unet, null_context=emb_u)
    param = eps_param(scheduler.alphas_cumprod.double())
    cond = {"y": emb_c if cfg_scale else emb_u.expand(2, -1, -1)}
    with torch.no_grad():
        with SAG(net, param, "mid_block.attentions.0.transformer_blocks.0.attn1", scale=0.75, blur=(9, 1.0),
                 w=cfg_scale, **cond) as sag:
            got = sag(latents, torch.full((2,), float(t)))
        want = _sag_pipeline_eps(unet, scheduler, latents, torch.tensor(t), emb_u.expand(2, -1, -1),
                                 emb_c if cfg_scale else None, cfg_scale, 0.75)
    assert (got - want).norm() / want.norm() <= 1e-4


def test_sag_drives_an_unconditional_diffusers_unet_through_ddim():
    from sgengine.diffusion.samplers import sample
    from sgengine.guidance import DiffusersDenoiser
    unet, cfg = _diffusers_unet(conditional=False), preset("tiny")
    param = parameterization_for("ddpm", cfg)
    net, x = DiffusersDenoiser(unet), torch.randn(2, 1, 8, 8)
    sigmas = torch.cat([param.sigma(torch.linspace(999, 0, 3, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)])

    def ddim(model):
        return sample(param, model, x, sigmas=sigmas, sampler="ddim", clip_x0=True)
    plain = ddim(lambda x, t: net(x, t))
    with SAG(net, param, "mid_block.attentions.0", scale=0.0) as sag:
        assert torch.equal(ddim(sag), plain)
    with SAG(net, param, "down_blocks.0.attentions.0", scale=0.75, blur=(3, 1.0)) as sag:
        guided = ddim(sag)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    assert unet.down_blocks[0].attentions[0].processor.__class__.__module__.startswith("diffusers")


def test_diffusers_denoiser_names_the_missing_null_condition():
    from sgengine.guidance import DiffusersDenoiser
    net = DiffusersDenoiser(_diffusers_unet(conditional=True))
    x, t, context = torch.randn(2, 1, 8, 8), torch.full((2,), 10.0), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="null_context="):
        CFG(net, 2.0, y=context)(x, t)
    with pytest.raises(ValueError, match="pass y="):
        net(x, t)
    short = DiffusersDenoiser(net.net, null_context=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="must match the context"):
        CFG(short, 2.0, y=context)(x, t)


# --- end to end: train a tiny checkpoint, sample through the CLI -------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cli_samples_with_sag_from_a_trained_checkpoint(tmp_path, objective, capsys):
    run = tmp_path / "run"
    cfg = dataclasses.replace(preset("tiny"), out=str(run), condition="labels", objective=objective,
                              steps=2, ckpt_every=2, sample_steps=2, log_every=1)
    Trainer(cfg).run()
    assert sample_main(["--ckpt", str(run), "--list_layers"]) == 0
    assert "mid.1.attn" in capsys.readouterr().out.split()
    png = tmp_path / "sag.png"
    window = {"ddpm": "0,1000", "edm": "0.01,100", "flow": "0.2,1"}[objective]
    rc = sample_main(["--ckpt", str(run), "--n", "4", "--clusters", "0", "1", "--steps", "2", "--sag_scale", "0.75",
                      "--sag_layer", "mid.1.attn", "--sag_blur", "3,1.0", "--sag_window", window,
                      "--out", str(png)])
    assert rc == 0 and png.exists()
    images = np.load(png.with_suffix(".npz"))["images"]
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert sample_main(["--ckpt", str(run), "--sag_scale", "0.5", "--sag_layer", "bad"]) == 2
    err = capsys.readouterr().err
    assert "'bad'" in err or "bad is not" in err
    assert "mid.1.attn" in err  # the error names the layers to choose from


# --- online (prototype) checkpoints: the same guidance stack from the CLI --------------------------

@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    return tiny_online_run(tmp_path_factory.mktemp("online-sag") / "run", steps=6, batch_size=16, sample_steps=1,
                           grid=1)


def test_cli_sag_scale_changes_online_samples(online_run, tmp_path):
    def images(*extra):
        png = tmp_path / f"s{len(list(tmp_path.iterdir()))}.png"
        assert sample_main(["--ckpt", str(online_run), "--n", "2", "--prototypes", "0", "--steps", "3",
                            "--out", str(png), *extra]) == 0
        return np.load(png.with_suffix(".npz"))["images"]

    plain, zero = images(), images("--sag_scale", "0")
    half, five = images("--sag_scale", "0.5", "--sag_blur", "3,1.0"), images("--sag_scale", "5", "--sag_blur", "3,1.0")
    assert np.array_equal(plain, zero)  # scale 0 is exactly the unguided sampler
    assert not np.array_equal(zero, half) and not np.array_equal(half, five)


def test_online_sag_step_equals_the_paper_formula(online_run):
    """One denoiser call of the stack the CLI uses (sampling.guided) on an online generator with
    prototype conditions equals SAG + CFG computed by hand (SPEC section 4)."""
    from sgengine.online.trainer import load_online, prototype_condition
    from sgengine.sampling import guided

    gen = load_online(online_run)
    _randomise(gen.gen.net)  # a trained-for-6-steps net attends almost uniformly: no mask to test
    cond = prototype_condition(gen, torch.tensor([0, 1]))
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.6)
    with torch.no_grad():
        with guided(gen.gen, 2.0, cond, sag_scale=0.8, sag_layer="mid_block.attn", sag_blur=(3, 1.0)) as denoise:
            got = denoise(x, t)
        want = _reference("flow", gen.gen.cfg, gen.gen.net, "mid_block.attn", x, t, cond["y"], 2.0, 0.8, (3, 1.0),
                          1.0, extras=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
