"""diffusers guiders for SAG, PAG and SEG (sgengine.guidance.guiders) in diffusers' modular SD3
pipeline, built from a tiny random SD3 transformer (tests/tiny_pipelines.py) at a non-square latent."""
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

import tiny_pipelines as tp

diffusers = pytest.importorskip("diffusers")
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance  # noqa: E402
from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (  # noqa: E402
    StableDiffusion3T2ICoreDenoiseStep)

from sgengine.guidance import adapter_for  # noqa: E402
from sgengine.guidance.guiders import PAGGuider, SAGGuider, SEGGuider, sd3_guided_step  # noqa: E402
from sgengine.kernels import gaussian_blur_ref  # noqa: E402

W_CFG, S = 5.0, 0.75


@pytest.fixture(scope="module")
def sd3():
    return tp.sd3()


def modular(sd3, guider):
    pipe, _ = sd3
    out = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    out.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    return out


def run(sd3, guider, steps=2):
    """Latents of the modular pipeline with ``guider``, and the number of transformer forwards."""
    calls = []
    handle = sd3[0].transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = modular(sd3, guider)(**sd3[1], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                   output="latents")
    finally:
        handle.remove()
    return out, len(calls)


def test_scale_zero_is_exactly_the_cfg_or_apg_guider(sd3):
    cfg, forwards = run(sd3, ClassifierFreeGuidance(guidance_scale=W_CFG))
    assert forwards == 4  # 2 steps x (cond, uncond)
    for guider in (SAGGuider(guidance_scale=W_CFG, sag_scale=0.0),
                   PAGGuider(guidance_scale=W_CFG, perturbed_guidance_scale=0.0),
                   SEGGuider(guidance_scale=W_CFG, seg_guidance_scale=0.0)):
        assert torch.equal(run(sd3, guider)[0], cfg), type(guider).__name__
    apg = lambda: AdaptiveProjectedGuidance(guidance_scale=W_CFG, eta=0.0, adaptive_projected_guidance_momentum=-0.5)
    assert torch.equal(run(sd3, SAGGuider(sag_scale=0.0, cfg=apg()))[0], run(sd3, apg())[0])


@pytest.mark.parametrize("make, forwards", [
    (lambda: SAGGuider(guidance_scale=W_CFG, sag_scale=S), 6),  # cond, uncond (+ mass), uncond at x_deg
    (lambda: SAGGuider(sag_scale=S, cfg=AdaptiveProjectedGuidance(guidance_scale=W_CFG, eta=0.0)), 6),
    (lambda: SAGGuider(guidance_scale=1.0, sag_scale=S), 4),  # no CFG: cond (+ mass), cond at x_deg
    (lambda: PAGGuider(guidance_scale=W_CFG, perturbed_guidance_scale=3.0), 6),
    (lambda: SEGGuider(guidance_scale=W_CFG, seg_guidance_scale=3.0, seg_blur_sigma=1.0), 6),
    (lambda: SAGGuider(guidance_scale=W_CFG, sag_scale=S, sag_start=0.5), 5),  # the window: step 1 of 2 only
], ids=["sag+cfg", "sag+apg", "sag", "pag+cfg", "seg+cfg", "sag-window"])
def test_passes_are_shared_and_leave_no_hook(sd3, make, forwards):
    processors = dict(sd3[0].transformer.attn_processors)
    cfg = run(sd3, ClassifierFreeGuidance(guidance_scale=W_CFG))[0]
    out, n = run(sd3, make())
    assert n == forwards and not torch.allclose(out, cfg, atol=1e-4)
    assert dict(sd3[0].transformer.attn_processors) == processors
    assert not sd3[0].transformer._forward_pre_hooks




@pytest.fixture(scope="module")
def step_inputs(sd3):
    pipe, kw = sd3
    x = torch.randn(2, 4, tp.H, tp.W, generator=torch.Generator().manual_seed(5))
    cond = (kw["prompt_embeds"].expand(2, -1, -1), kw["pooled_prompt_embeds"].expand(2, -1))
    uncond = (kw["negative_prompt_embeds"].expand(2, -1, -1), kw["negative_pooled_prompt_embeds"].expand(2, -1))
    return pipe.transformer, x, torch.tensor(700.0), cond, uncond


@torch.no_grad()
def test_one_sag_step_equals_the_formula_by_hand(step_inputs):
    net, x, t, cond, uncond = step_inputs
    got = sd3_guided_step(SAGGuider(guidance_scale=W_CFG, sag_scale=S), net, x, t, cond, uncond)

    def model(x, c):
        return net(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=c[0], pooled_projections=c[1]).sample
    adapter = adapter_for(net)
    pred_c = model(x, cond)
    with adapter.capture(adapter.default_layer) as hook:  # the key mass (its own reference tests: the adapters')
        pred_u = model(x, uncond)
    assert hook.mass.shape == (2, tp.H // 2, tp.W // 2)  # 4 x 6 tokens: non-square
    s = t / 1000  # flow matching as diffusers runs it: x = (1 - s) x0 + s eps, v = eps - x0
    x0, eps = x - s * pred_u, x + (1 - s) * pred_u
    share = hook.mass / hook.mass.mean(dim=(1, 2), keepdim=True)
    mask = F.interpolate((share > 1.0).float()[:, None], scale_factor=2, mode="nearest")  # patch 2
    x_deg = (1 - s) * (mask * gaussian_blur_ref(x0, 9, 1.0) + (1 - mask) * x0) + s * eps
    pred_deg = model(x_deg, uncond)
    gain = -1 / (1 - s)  # d v / d x at fixed eps
    want = pred_u + W_CFG * (pred_c - pred_u) + S * (pred_u - pred_deg - gain * (x - x_deg))
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sag_term_composes_with_apg_unchanged(step_inputs):
    """APG replaces only the CFG part: SAG+APG - APG = SAG+CFG - CFG (the shared passes feed both)."""
    apg = lambda: AdaptiveProjectedGuidance(guidance_scale=W_CFG, eta=0.0, adaptive_projected_guidance_rescale=2.0)
    net, x, t, cond, uncond = step_inputs
    with_apg = (sd3_guided_step(SAGGuider(sag_scale=S, cfg=apg()), net, x, t, cond, uncond)
                - sd3_guided_step(apg(), net, x, t, cond, uncond))
    with_cfg = (sd3_guided_step(SAGGuider(guidance_scale=W_CFG, sag_scale=S), net, x, t, cond, uncond)
                - sd3_guided_step(ClassifierFreeGuidance(guidance_scale=W_CFG), net, x, t, cond, uncond))
    assert with_cfg.abs().max() > 1e-3
    torch.testing.assert_close(with_apg, with_cfg, atol=1e-5, rtol=1e-5)


def test_block_state_inputs_pick_the_condition_of_each_pass():
    from diffusers.modular_pipelines.modular_pipeline import BlockState
    state = BlockState(latents=torch.zeros(1), prompt_embeds=torch.ones(1), negative_prompt_embeds=-torch.ones(1))
    fields = {"hidden_states": "latents", "encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds")}
    for guider, under in ((SAGGuider(guidance_scale=W_CFG), -1.0), (PAGGuider(guidance_scale=W_CFG), 1.0)):
        guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(500.0))
        batches = guider.prepare_inputs_from_block_state(state, fields)
        assert [b.encoder_hidden_states.item() for b in batches] == [1.0, -1.0, under]
        assert [getattr(b, "__guidance_identifier__") for b in batches][2] == guider.extra


@torch.no_grad()
@pytest.mark.parametrize("mode", ["pag", "seg"])
def test_one_perturbed_step_equals_the_formula(step_inputs, mode):
    net, x, t, cond, uncond = step_inputs
    layer = "transformer_blocks.0.attn"
    guider = (PAGGuider(guidance_scale=W_CFG, perturbed_guidance_scale=S, layer=layer) if mode == "pag" else
              SEGGuider(guidance_scale=W_CFG, seg_guidance_scale=S, seg_blur_sigma=1.0, layer=layer))
    got = sd3_guided_step(guider, net, x, t, cond, uncond)

    def model(x, c):
        return net(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=c[0], pooled_projections=c[1]).sample
    pred_c, pred_u = model(x, cond), model(x, uncond)
    with adapter_for(net).perturb(layer, mode, sigma=1.0 if mode == "seg" else None):
        pred_p = model(x, cond)
    torch.testing.assert_close(got, pred_u + W_CFG * (pred_c - pred_u) + S * (pred_c - pred_p), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_diffusers_seg_guider_never_perturbs_where_ours_does(step_inputs):
    """diffusers' SmoothedEnergyGuidance never increments _count_prepared: its hooks are never
    applied and its 'perturbed' pass is the condition pass again, so SEG adds nothing to CFG."""
    from diffusers.guiders import SmoothedEnergyGuidance
    net, x, t, cond, uncond = step_inputs
    cfg = sd3_guided_step(ClassifierFreeGuidance(guidance_scale=W_CFG), net, x, t, cond, uncond)
    theirs = sd3_guided_step(SmoothedEnergyGuidance(guidance_scale=W_CFG, seg_guidance_scale=S, seg_guidance_layers=[0],
                                              seg_blur_sigma=1.0), net, x, t, cond, uncond)
    ours = sd3_guided_step(SEGGuider(guidance_scale=W_CFG, seg_guidance_scale=S, seg_blur_sigma=1.0), net, x, t, cond, uncond)
    torch.testing.assert_close(theirs, cfg, atol=1e-6, rtol=0)
    assert (ours - cfg).abs().max() > 1e-3


def test_bad_layer_fails_in_one_line_before_any_forward(sd3):
    calls = []
    handle = sd3[0].transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(KeyError, match="available layers: .*transformer_blocks.0.attn"):
            run(sd3, SAGGuider(guidance_scale=W_CFG, layer="transformer_blocks.9.attn"))
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(ValueError, match="either guidance_scale .* or cfg="):
        SAGGuider(guidance_scale=2.0, cfg=ClassifierFreeGuidance())
    with pytest.raises(ValueError, match="blur must be"):
        SAGGuider(blur=(4, 1.0))


def test_new_keeps_the_cfg_part_and_the_scheduler(sd3):
    apg = AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.0)
    g = SAGGuider(sag_scale=0.5, cfg=apg, scheduler=sd3[0].scheduler).new(sag_scale=0.25)
    assert g.scale == 0.25 and isinstance(g.cfg, AdaptiveProjectedGuidance) and g.cfg.guidance_scale == 3.0
    assert g.cfg is not apg and g.scheduler is sd3[0].scheduler
    assert SAGGuider(guidance_scale=4.0).new(guidance_scale=2.0).cfg.guidance_scale == 2.0
    assert PAGGuider(guidance_scale=4.0).new().cfg.guidance_scale == 4.0  # by keyword: diffusers' from_config
    # resets positional arguments to their defaults


def test_old_diffusers_fails_in_one_line_naming_the_version(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    monkeypatch.delitem(sys.modules, "sgengine.guidance.guiders")
    with pytest.raises(ImportError) as err:
        importlib.import_module("sgengine.guidance.guiders")
    assert "diffusers >= 0.36" in str(err.value) and "installed 0.35.2" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_pag_guider_matches_diffusers_sd3_pag_pipeline_where_it_keeps_the_qk_norm(qk_norm):
    """diffusers' PAGJointAttnProcessor2_0 perturbs the image-image block (right) but skips norm_q /
    norm_k: with qk_norm=None (SD3) both agree; with SD3.5's rms_norm its perturbed branch is not the
    model's attention, and ours (the norms kept, the adapters' identity op) differs from it."""
    from diffusers import StableDiffusion3PAGPipeline
    pipe, kw = tp.sd3(qk_norm=qk_norm)
    theirs = StableDiffusion3PAGPipeline(
        transformer=pipe.transformer, scheduler=pipe.scheduler, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, pag_applied_layers=["blocks.1"])
    want = theirs(**kw, num_inference_steps=2, generator=torch.Generator().manual_seed(0), guidance_scale=W_CFG,
                  pag_scale=3.0, output_type="latent").images
    ours = run((pipe, kw), PAGGuider(guidance_scale=W_CFG, perturbed_guidance_scale=3.0,
                                     layer="transformer_blocks.1.attn"))[0]
    if qk_norm is None:
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    else:
        assert (ours - want).abs().max() > 1e-3


def test_diffusers_pag_guider_refuses_sd3_where_ours_runs():
    """diffusers' PAG guider needs a registered attention processor; SD3's JointAttnProcessor2_0 is not."""
    from diffusers.guiders import PerturbedAttentionGuidance
    sd3 = tp.sd3()  # its own: the failed run may leave diffusers' hook registry on the model
    theirs = PerturbedAttentionGuidance(guidance_scale=W_CFG, perturbed_guidance_scale=3.0,
                                        perturbed_guidance_layers=[1], perturbed_guidance_start=0.0,
                                        perturbed_guidance_stop=1.0)
    with pytest.raises(ValueError, match="JointAttnProcessor2_0.* not registered"):
        run(sd3, theirs, steps=3)
    assert run(sd3, PAGGuider(guidance_scale=W_CFG, layer="transformer_blocks.1.attn"), steps=3)[1] == 9


@pytest.mark.parametrize("mode", ["sag", "pag", "seg"])
def test_guider_equals_the_pipeline_drop_in(sd3, mode):
    """The same guided run through the modular pipeline's guider and through sg.sag / sg.pag / sg.seg
    on StableDiffusion3Pipeline (one batched [uncond; cond] forward plus the extra one): equal up to
    the batched matmuls' rounding."""
    import sgengine as sg
    pipe, kw = sd3
    guider, drop_in = {
        "sag": (SAGGuider(guidance_scale=W_CFG, sag_scale=S, scheduler=pipe.scheduler), lambda: sg.sag(pipe, scale=S)),
        "pag": (PAGGuider(guidance_scale=W_CFG, perturbed_guidance_scale=3.0), lambda: sg.pag(pipe, scale=3.0)),
        "seg": (SEGGuider(guidance_scale=W_CFG, seg_guidance_scale=3.0, seg_blur_sigma=10.0),
                lambda: sg.seg(pipe, scale=3.0, sigma=10.0))}[mode]
    with drop_in():
        want = tp.run(pipe, kw, steps=2, guidance_scale=W_CFG)
    got = run(sd3, guider)[0]
    assert (got - run(sd3, ClassifierFreeGuidance(guidance_scale=W_CFG))[0]).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
