"""scheduler_param: a diffusers scheduler as the engine's Parameterization (flow matching as diffusers runs it)."""
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import tiny_pipelines as tp  # noqa: E402
from sgengine.diffusion.samplers import sample  # noqa: E402
from sgengine.guidance.schedulers import flow_shift_mu, scheduler_param  # noqa: E402


def test_flow_conversions_are_diffusers_flow_matching():
    p = scheduler_param(FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    t = torch.tensor([1000.0, 600.0, 37.5])
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t, v = (1 - s) * x0 + s * eps, eps - x0  # diffusers: the scheduler's step is x + (s_next - s) v
    a, b = p.coeffs(t)
    assert torch.allclose(a, 1 - t / 1000) and torch.allclose(b, t / 1000)
    assert torch.allclose(p.prediction(x0, eps, t), v)
    got_x0, got_eps = p.x0_eps(x_t, v, t)
    assert torch.allclose(got_x0, x_t - s * v) and torch.allclose(got_eps, x_t + (1 - s) * v)
    assert torch.allclose(got_x0[1:], x0[1:], atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)
    # d v / d x_t at fixed eps: v = eps - (x_t - s eps) / (1 - s); at s = 1 it is set to 0 (x_deg = x_t there)
    assert torch.allclose(p.input_gain(t), torch.tensor([0.0, -1 / 0.4, -1 / (1 - 0.0375)]))
    sig = p.sigma(t[1:])
    assert torch.allclose(p.time(sig), t[1:].double()) and torch.allclose(p.scale(sig).double(), 1 - t[1:].double() / 1000)
    assert float(p.time(torch.tensor(math.inf))) == 1000.0


def _ran_sigmas(pipe, kw):
    tp.run(pipe, kw, steps=5)
    s = pipe.scheduler.sigmas.double()
    return torch.where(s < 1, s / (1 - s), torch.full_like(s, math.inf))


def test_grid_is_the_pipelines_own_static_shift_sd3():
    pipe, kw = tp.sd3(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    p = scheduler_param(pipe.scheduler)
    assert torch.allclose(p.grid(5), _ran_sigmas(pipe, kw), rtol=1e-6)


def test_grid_is_the_pipelines_own_dynamic_shift_flux():
    pipe, kw = tp.flux()
    pipe.set_progress_bar_config(disable=True)
    seq = (tp.H // 2) * (tp.W // 2)
    p = scheduler_param(pipe.scheduler, image_seq_len=seq, sigmas=lambda n: torch.linspace(1, 1 / n, n).numpy())
    assert torch.allclose(p.grid(5), _ran_sigmas(pipe, kw), rtol=1e-6)
    m = (1.15 - 0.5) / (4096 - 256)  # Flux's calculate_shift, by hand
    assert flow_shift_mu(pipe.scheduler, seq) == pytest.approx(0.5 + m * (seq - 256))
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler_param(pipe.scheduler).grid(5)


def test_engine_sampler_on_the_param_equals_the_pipeline():
    """Plain SD3 (no CFG) through the engine's Euler sampler on scheduler_param = the pipeline's own run."""
    pipe, kw = tp.sd3()
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, tp.H, tp.W, generator=torch.Generator().manual_seed(5))
    ref = tp.run(pipe, kw, steps=4, latents=noise, guidance_scale=1.0)

    def model(x_t, t):
        return pipe.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=kw["prompt_embeds"],
                                pooled_projections=kw["pooled_prompt_embeds"], return_dict=False)[0]
    with torch.no_grad():
        got = sample(scheduler_param(pipe.scheduler), model, noise, 4, sampler="euler")
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())


def test_alpha_bar_schedulers_and_bad_input():
    s = DDIMScheduler(prediction_type="v_prediction")
    assert scheduler_param(s).name == "v" and scheduler_param(DDIMScheduler()).name == "eps"
    with pytest.raises(TypeError, match="not supported"):
        scheduler_param(DDIMScheduler(prediction_type="sample"))
