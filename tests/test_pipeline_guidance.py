"""sg.sag / sg.pag / sg.seg on tiny random diffusers pipelines (tiny_pipelines.py), at a non-square latent."""
import inspect

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import tiny_pipelines as tp  # noqa: E402
import sgengine as sg  # noqa: E402
from sgengine.guidance.adapters import adapter_for  # noqa: E402
from sgengine.kernels.sag_degrade import gaussian_blur_ref  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
GUIDES = {"sag": (sg.sag, 0.75), "pag": (sg.pag, 3.0), "seg": (sg.seg, 3.0)}


def _state(net):
    """What the context changes on the denoiser: its hooks and its attention processors."""
    procs = {n: type(m.processor) for n, m in net.named_modules() if hasattr(m, "processor")}
    return len(net._forward_hooks), len(net._forward_pre_hooks), procs


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("name", tp.BUILDERS)
def test_scale_zero_is_the_plain_pipeline_and_exit_restores(name, guide):
    pipe, kw = tp.BUILDERS[name]()
    net, (fn, scale) = getattr(pipe, "unet", None) or pipe.transformer, GUIDES[guide]
    before, ref = _state(net), tp.run(pipe, kw)
    with fn(pipe, scale=0.0):
        assert torch.equal(tp.run(pipe, kw), ref)
    with pytest.raises(RuntimeError, match="inside"):
        with fn(pipe, scale=scale):
            guided = tp.run(pipe, kw)
            raise RuntimeError("inside")
    assert not torch.allclose(guided, ref, atol=1e-3)  # it guides ...
    assert _state(net) == before and torch.equal(tp.run(pipe, kw), ref)  # ... and leaves nothing behind


def _spy(pipe):
    """Record (model_output, timestep, sample) of every scheduler step: the guided prediction the pipeline uses."""
    calls, step = [], pipe.scheduler.step

    def record(model_output, timestep, sample, *args, **kwargs):
        calls.append((model_output.clone(), timestep, sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)
    pipe.scheduler.step = record
    return calls


def _mass_mask(net, layer, forward, rows, size):
    """M = mass > its mean over the image keys, read from the adapter's capture, up to the latent's size."""
    with adapter_for(net).capture(layer) as hook:
        hook.rows = rows
        forward()
        mass = hook.mass
    on = (mass / mass.mean(dim=(1, 2), keepdim=True) > 1.0)[:, None]
    return on.repeat_interleave(size[0] // on.shape[2], 2).repeat_interleave(size[1] // on.shape[3], 3)


def _blur_where(x0, on):
    return torch.where(on, gaussian_blur_ref(x0, 9, 1.0), x0)


def _flow_conditions(name, kw):
    """The [uncond; cond] arguments the SD3 / Sana pipelines hand their transformer."""
    cat = lambda a, b: torch.cat([kw[a], kw[b]])  # noqa: E731
    if name == "sd3":
        return {"encoder_hidden_states": cat("negative_prompt_embeds", "prompt_embeds"),
                "pooled_projections": cat("negative_pooled_prompt_embeds", "pooled_prompt_embeds")}
    return {"encoder_hidden_states": cat("negative_prompt_embeds", "prompt_embeds"),
            "encoder_attention_mask": cat("negative_prompt_attention_mask", "prompt_attention_mask")}


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd3", "sana"])
def test_flow_cfg_sag_step_is_the_formula_by_hand(name):
    """Flow matching under the pipeline's CFG (SD3: joint attention, patch 2; Sana: linear attention):
    the guided velocity of step 2 by hand, in eps space (Eq. 17)."""
    pipe, kw = tp.BUILDERS[name]()
    w, s_sag = 5.0, 0.75
    calls = _spy(pipe)
    with sg.sag(pipe, scale=s_sag) as g:
        tp.run(pipe, kw, steps=3, guidance_scale=w)
    v_got, t, x = calls[1]
    net, sig = pipe.transformer, float(t) / 1000
    cond = _flow_conditions(name, kw)

    def T(xx, rows=slice(0, 2)):
        return net(hidden_states=xx, timestep=t.expand(len(xx)), return_dict=False,
                   **{k: v[rows] for k, v in cond.items()})[0]
    on = _mass_mask(net, g.layer, lambda: T(torch.cat([x, x])), slice(0, 1), x.shape[-2:])
    v_u, v_c = T(torch.cat([x, x])).chunk(2)
    x0, eps = x - sig * v_u, x + (1 - sig) * v_u
    x_deg = (1 - sig) * _blur_where(x0, on) + sig * eps
    eps_deg = x_deg + (1 - sig) * T(x_deg, slice(0, 1))
    want = v_u + w * (v_c - v_u) + s_sag * (eps - eps_deg) / (1 - sig)  # eps-space guidance as a velocity
    assert 0 < sig < 1 and on.any() and not on.all()
    assert torch.allclose(v_got, want, atol=1e-5), float((v_got - want).abs().max())


@torch.no_grad()
def test_flux_sag_step_is_the_formula_by_hand():
    """Guidance-distilled Flux: no CFG batch, 2x2-packed latents, dynamic shift."""
    pipe, kw = tp.flux()
    s_sag = 0.75
    calls = _spy(pipe)
    with sg.sag(pipe, scale=s_sag) as g:
        tp.run(pipe, kw, steps=3)
    v_got, t, x = calls[1]
    net, sig = pipe.transformer, float(pipe.scheduler.sigmas[1])
    h, w = tp.H // 2, tp.W // 2
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
    args = dict(timestep=(t / 1000).expand(1), guidance=torch.full((1,), kw["guidance_scale"]),
                pooled_projections=kw["pooled_prompt_embeds"], encoder_hidden_states=kw["prompt_embeds"],
                txt_ids=torch.zeros(7, 3), img_ids=ids.reshape(-1, 3), return_dict=False)

    def T(xx):
        return net(hidden_states=xx, **args)[0]
    unpack = lambda z: pipe._unpack_latents(z, 8 * tp.H, 8 * tp.W, pipe.vae_scale_factor)  # noqa: E731
    on = _mass_mask(net, g.layer, lambda: T(x), None, (tp.H, tp.W))
    v = T(x)
    x0, eps = unpack(x - sig * v), unpack(x + (1 - sig) * v)
    x_deg = pipe._pack_latents((1 - sig) * _blur_where(x0, on) + sig * eps, 1, 4, tp.H, tp.W)
    eps_deg = x_deg + (1 - sig) * T(x_deg)
    want = v + s_sag * (x + (1 - sig) * v - eps_deg) / (1 - sig)
    assert torch.allclose(sig * torch.ones(1), t / 1000) and on.any() and not on.all()
    assert torch.allclose(v_got, want, atol=1e-5), float((v_got - want).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd", "pixart", "dit"])
def test_eps_sag_step_is_the_formula_by_hand(name):
    """eps prediction: SD's UNet (mask from its mid block), PixArt / DiT with a learned sigma (2C channels, the
    variance half passed through); DiT's CFG batch is [cond; uncond]."""
    pipe, kw = tp.BUILDERS[name]()
    w, s_sag, net = 4.5, 0.75, getattr(pipe, "unet", None) or pipe.transformer
    calls = _spy(pipe)
    with sg.sag(pipe, scale=s_sag) as g:
        tp.run(pipe, kw, steps=2, guidance_scale=w)
        eps_got, t, x = calls[1]
        if name == "dit":
            x, eps_got = x[:1], eps_got[:1]  # the DiT pipeline steps the doubled batch
        cond = _conditions(pipe, kw, name)
        hooked = net(torch.cat([x, x]), timestep=t.expand(2), return_dict=False, **cond)[0]
    plain_batch = net(torch.cat([x, x]), timestep=t.expand(2), return_dict=False, **cond)[0]
    # the variance half is the forward's own (the key-mass attention reorders sums: float32 rounding only)
    assert torch.allclose(hooked[:, 4:], plain_batch[:, 4:], atol=1e-5)
    assert not torch.allclose(hooked[:, :4], plain_batch[:, :4], atol=1e-2)
    uncond = slice(1, 2) if name == "dit" else slice(0, 1)
    T = lambda xx, rows=slice(0, 2): net(xx, timestep=t.expand(len(xx)), return_dict=False,  # noqa: E731
                                         **{k: v if isinstance(v, dict) else v[rows] for k, v in cond.items()})[0][:, :4]
    on = _mass_mask(net, g.layer, lambda: T(torch.cat([x, x])), uncond, x.shape[-2:])
    out = T(torch.cat([x, x]))
    e_u, e_c = out[uncond], out[1 - uncond.start: 2 - uncond.start]
    abar = pipe.scheduler.alphas_cumprod[t.long()].float()
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x0 = (x - b * e_u) / a
    x_deg = a * _blur_where(x0, on) + b * e_u
    want = e_u + w * (e_c - e_u) + s_sag * (e_u - T(x_deg, uncond))
    assert on.any() and not on.all()
    assert torch.allclose(eps_got, want, atol=1e-4 * float(want.abs().max())), float((eps_got - want).abs().max())


def _conditions(pipe, kw, name):
    if name == "dit":
        return {"class_labels": torch.tensor([kw["class_labels"][0], 1000])}
    if name == "sd":
        return {"encoder_hidden_states": torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])}
    mask = torch.cat([kw["negative_prompt_attention_mask"], kw["prompt_attention_mask"]])
    return {"encoder_hidden_states": torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]]),
            "encoder_attention_mask": mask, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


PAG_PIPELINES = [("sd3", "StableDiffusion3PAGPipeline", "blocks.1", "transformer_blocks.1.attn"),
                 ("pixart", "PixArtSigmaPAGPipeline", "blocks.1", "transformer_blocks.1.attn1"),
                 ("sdxl", "StableDiffusionXLPAGPipeline", "mid", "mid_block.attentions.0.transformer_blocks.0.attn1")]


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("name,cls,theirs,ours", PAG_PIPELINES)
def test_pag_equals_diffusers_pag_pipelines(name, cls, theirs, ours, guidance_scale):
    """With and without the pipeline's CFG; 1e-5 relative to the largest latent (PixArt's and SDXL's tiny random
    models reach |x| ~ 700 with their schedulers, where float32 rounding of a reordered sum is ~1e-4)."""
    pipe, kw = tp.BUILDERS[name]()
    cls = getattr(diffusers, cls)
    names = inspect.signature(cls.__init__).parameters
    ref_pipe = cls(**{k: v for k, v in pipe.components.items() if k in names}, pag_applied_layers=[theirs])
    ref_pipe.set_progress_bar_config(disable=True)
    ref = tp.run(ref_pipe, kw, guidance_scale=guidance_scale, pag_scale=3.0)
    with sg.pag(pipe, scale=3.0, layer=ours):
        got = tp.run(pipe, kw, guidance_scale=guidance_scale)
    plain = tp.run(pipe, kw, guidance_scale=guidance_scale)
    tol = 1e-5 * float(ref.abs().max())
    assert float((got - ref).abs().max()) <= tol < 1e-2 * float((plain - ref).abs().max())


def test_pag_on_sd35_qk_norm_differs_from_diffusers_by_the_skipped_norm():
    """diffusers' PAGJointAttnProcessor2_0 builds the perturbed path's q, k without norm_q / norm_k / norm_added_q /
    norm_added_k, so on SD3.5 (qk_norm="rms_norm") the logits of an image query over its own key and the text keys
    are not the model's; ours keep the norms. Equal at qk_norm=None (above), different here, well above rounding."""
    pipe, kw = tp.sd3(qk_norm="rms_norm")
    ref_pipe = diffusers.StableDiffusion3PAGPipeline(
        transformer=pipe.transformer, scheduler=pipe.scheduler, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, pag_applied_layers=["blocks.1"])
    ref_pipe.set_progress_bar_config(disable=True)
    theirs = tp.run(ref_pipe, kw, guidance_scale=5.0, pag_scale=3.0)
    with sg.pag(pipe, scale=3.0, layer="transformer_blocks.1.attn"):
        ours = tp.run(pipe, kw, guidance_scale=5.0)
    assert float((ours - theirs).abs().max()) > 1e-3 * float(theirs.abs().max())


class _SD3Net(torch.nn.Module):
    """The SD3 transformer as the engine's native network net(x_t, t, y, pooled, null): null rows take the negative prompt."""

    def __init__(self, transformer, kw):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("neg", kw["negative_prompt_embeds"], persistent=False)
        self.register_buffer("neg_pool", kw["negative_pooled_prompt_embeds"], persistent=False)

    def forward(self, x, t, y=None, pooled=None, null=None):
        if null is not None:
            y = torch.where(null.view(-1, 1, 1), self.neg, y)
            pooled = torch.where(null.view(-1, 1), self.neg_pool, pooled)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=y, pooled_projections=pooled,
                                return_dict=False)[0]


@torch.no_grad()
def test_sag_on_the_pipeline_equals_sg_sample_with_the_engines_sampler():
    """CFG + SAG on SD3: the pipeline's own loop under sg.sag = sg.sample's Euler on scheduler_param with SAG."""
    pipe, kw = tp.sd3()
    steps, w, seed = 3, 5.0, 7
    gen = sg.Generator.of(_SD3Net(pipe.transformer, kw), sg.scheduler_param(pipe.scheduler), (4, tp.H, tp.W),
                          sampler="euler")
    layer = adapter_for(pipe.transformer).default_layer
    engine = sg.sample(gen, w=w, steps=steps, seed=seed, sag_scale=0.75, sag_layer=layer,
                       cond={"y": kw["prompt_embeds"], "pooled": kw["pooled_prompt_embeds"]})
    noise = torch.randn(1, 4, tp.H, tp.W, generator=torch.Generator().manual_seed(seed))
    with sg.sag(pipe, scale=0.75):
        ours = tp.run(pipe, kw, steps=steps, latents=noise, guidance_scale=w)
    plain = tp.run(pipe, kw, steps=steps, latents=noise, guidance_scale=w)
    assert torch.allclose(ours, engine, atol=1e-5), float((ours - engine).abs().max())
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_bad_input_is_one_line():
    pipe, kw = tp.sd3()
    with pytest.raises(TypeError, match="not a supported pipeline; supported: .*StableDiffusion3Pipeline.*FluxPipeline"):
        sg.sag(object())
    with pytest.raises(KeyError, match="available layers"):
        sg.sag(pipe, layer="transformer_blocks.9.attn")
    with pytest.raises(ValueError, match="window"):
        sg.pag(pipe, window=(900, 100))
    with pytest.raises(ValueError, match="blur"):
        sg.sag(pipe, blur=(8, 1.0))
