"""The one sampler contract: every (sampler, objective) pair on closed-form Gaussian data.

Data x0 ~ N(MU, S^2). For any objective's forward process x_t = a x0 + b eps the posterior mean is
E[x0 | x_t] = MU + a S^2 (x_t - a MU) / (a^2 S^2 + b^2), so the exact network of every
parameterisation is known; it is written out here from the schedules (independently of
sgengine.diffusion.param). In the samplers' units (x = x_t / a, sigma = b / a) the probability-flow
ODE has the closed form x(sigma) - MU = (x(sigma0) - MU) sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma0^2).
"""
import math

import pytest
import torch

from sgengine.diffusion import (SAMPLERS, alphas_cumprod, edm_param, eps_param, flow_param, flow_times, karras_sigmas,
                                linear_betas, sample, v_param)
from sgengine.diffusion.flow import SIGMA_MIN

MU, S = 0.3, 0.5
ABAR = alphas_cumprod(linear_betas())
PARAMS = {"eps": eps_param(ABAR), "v": v_param(ABAR), "edm": edm_param(), "flow": flow_param()}


def _ab(kind, t):
    """(a, b) of x_t = a x0 + b eps at native time t, from the schedules themselves."""
    t = t.double()
    if kind in ("eps", "v"):
        lo = t.floor().long().clamp(0, 999)
        hi = (lo + 1).clamp(max=999)
        abar = ABAR[lo] + (t - lo) * (ABAR[hi] - ABAR[lo])  # linear between integer timesteps
        return abar.sqrt(), (1 - abar).sqrt()
    if kind == "edm":
        return torch.ones_like(t), t
    return t, 1 - (1 - SIGMA_MIN) * t


def exact_net(kind):
    """The perfect native network of ``kind`` for N(MU, S^2) data: eps, v, D or flow velocity."""
    def net(x_t, t):
        a, b = (c.view(-1, *([1] * (x_t.dim() - 1))) for c in _ab(kind, t))
        x0 = MU + a * S**2 * (x_t.double() - a * MU) / (a**2 * S**2 + b**2)
        eps = (x_t.double() - a * x0) / b
        pred = {"eps": eps, "v": a * eps - b * x0, "edm": x0, "flow": x0 - (1 - SIGMA_MIN) * eps}[kind]
        return pred.to(x_t.dtype)
    return net


def closed_form(x, sigma0, sigma1):
    return MU + (x - MU) * math.sqrt(S**2 + sigma1**2) / math.sqrt(S**2 + sigma0**2)


def _error(sampler, kind, n):
    """Max error of ``sampler`` with n steps from sigma 10 to 0.05 (inside every schedule's range)."""
    sig = karras_sigmas(n, 0.05, 10.0)[:-1]
    x = torch.linspace(-25, 25, 11, dtype=torch.float64).view(11, 1)
    out = SAMPLERS[sampler](PARAMS[kind].denoiser(exact_net(kind)), x, sig)
    return (out - closed_form(x, 10.0, 0.05)).abs().max().item()


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("sampler,order", [("euler", 1), ("ddim", 1), ("heun", 2)])
def test_fixed_step_samplers_converge_at_their_order_on_every_objective(sampler, order, kind):
    errs = [_error(sampler, kind, n) for n in (16, 32, 64)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 2 ** order * 0.75 < coarse / fine < 2 ** order * 1.3, errs


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_dopri5_reaches_its_tolerance_on_every_objective(kind):
    assert _error("dopri5", kind, 2) < 2e-4
    assert _error("heun", kind, 8) > 1e-3  # a real gap: a coarse fixed-step solver does not reach it


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_pair_samples_the_data_distribution_from_its_own_grid(sampler, kind):
    """Through ``sample``: the objective's own grid and prior, every sampler, down to the data. (First-order
    samplers need many steps: at 40 their truncation error alone leaves the std ~8% low on this target.)"""
    noise = torch.randn(6000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    steps = {"heun": 40, "dopri5": 10, "ddpm": 1000}.get(sampler, 400)
    out = sample(PARAMS[kind], exact_net(kind), noise, steps, sampler=sampler,
                 generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64 and out.shape == noise.shape
    assert abs(out.mean().item() - MU) < 0.03
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_ddpm_is_stochastic_and_ddim_is_not():
    param, noise = PARAMS["eps"], torch.randn(500, 1)
    runs = [sample(param, exact_net("eps"), noise, 20, sampler=name, generator=torch.Generator().manual_seed(seed))
            for name in ("ddpm", "ddim") for seed in (0, 1)]
    assert not torch.allclose(runs[0], runs[1])
    torch.testing.assert_close(runs[2], runs[3], rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_conversions_invert_and_sigma_time_round_trip(kind):
    param = PARAMS[kind]
    t = {"eps": torch.tensor([0.0, 10.0, 500.5, 999.0]), "v": torch.tensor([0.0, 10.0, 500.5, 999.0]),
         "edm": torch.tensor([0.01, 1.0, 5.0, 80.0]), "flow": torch.tensor([0.01, 0.3, 0.7, 1.0])}[kind]
    x0, eps = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    a, b = (c.view(-1, 1, 1, 1) for c in _ab(kind, t))
    x_t = a * x0 + b * eps
    got = param.x0_eps(x_t, param.prediction(x0, eps, t), t)
    torch.testing.assert_close(got[0], x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(param.time(param.sigma(t)).double(), t.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(param.scale(param.sigma(t)).double(), a.flatten(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_callback_sees_every_step_and_stops_early(sampler):
    den, seen = PARAMS["edm"].denoiser(exact_net("edm")), []
    x = torch.randn(4, 1) * 80
    SAMPLERS[sampler](den, x, karras_sigmas(6), callback=lambda info: seen.append(info["i"]))
    assert seen and seen == list(range(len(seen)))
    assert len(seen) == 6 or sampler == "dopri5"  # fixed-step samplers: one call per step

    def stop(info):
        return info["i"] == 1

    out = SAMPLERS[sampler](den, x, karras_sigmas(6), callback=stop, generator=torch.Generator().manual_seed(0))
    last = {}
    SAMPLERS[sampler](den, x, karras_sigmas(6), callback=lambda info: last.update(info) or info["i"] == 1,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, last["denoised"])  # early stop returns the x0 estimate


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_clip_x0_keeps_estimates_in_range(sampler):
    wide = lambda x, sigma: 3 * x / (1 + sigma.view(-1, 1) ** 2) ** 0.5  # noqa: E731  a denoiser far outside [-1, 1]
    x = torch.randn(64, 1) * 80
    seen = []
    out = SAMPLERS[sampler](wide, x, karras_sigmas(5), clip_x0=True,
                            callback=lambda info: seen.append(info["denoised"].abs().max().item()))
    assert max(seen) <= 1.0 and out.abs().max() <= 1.0 + 1e-6
    assert SAMPLERS[sampler](wide, x, karras_sigmas(5)).abs().max() > 1.5


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        sample(PARAMS["edm"], exact_net("edm"), torch.randn(2, 1), 4, sampler="plms")


def test_ddim_equals_diffusers_ddim_scheduler():
    """Peer agreement: DDIM on an eps network equals diffusers' DDIMScheduler with aligned timesteps."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="leading")
    sch.set_timesteps(25)
    net = exact_net("eps")
    x = torch.randn(16, 1) * 1.0
    want = x.clone()
    for t in sch.timesteps:
        want = sch.step(net(want, torch.full((16,), float(t))), t, want).prev_sample
    param = PARAMS["eps"]  # diffusers' x_T is sample()'s unit noise: prior_scale(sigma_T) = 1 / a_T
    sigmas = torch.cat([param.sigma(sch.timesteps.double()), torch.zeros(1, dtype=torch.float64)])
    got = sample(param, net, x, sigmas=sigmas, sampler="ddim")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_input_gain_is_the_derivative_of_the_prediction_at_fixed_eps(kind):
    """SAG's correction term: d pred / d x_t holding eps fixed, checked by a central difference."""
    param = PARAMS[kind]
    t = {"eps": 400.0, "v": 400.0, "edm": 2.0, "flow": 0.4}[kind]
    t = torch.full((3,), t, dtype=torch.float64)
    a, b = (c.view(-1, 1) for c in _ab(kind, t))
    x_t, eps, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), 1e-4

    def pred(x):
        return param.prediction((x - b * eps) / a, eps, t)

    fd = (pred(x_t + h) - pred(x_t - h)) / (2 * h)
    torch.testing.assert_close(fd, param.input_gain(t).double().view(-1, 1).expand_as(fd), rtol=1e-4, atol=1e-4)


# --- peer agreement: k-diffusion's samplers, transcribed (k-diffusion is not a dependency) ---------------

def _kdiff_heun(model, x, sigmas, second_order=True):
    """k_diffusion.sampling.sample_heun / sample_euler without churn, step by step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, s * torch.ones(len(x), dtype=x.dtype))) / s
        dt = s_next - s
        if not second_order or s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, s_next * torch.ones(len(x), dtype=x.dtype))) / s_next
            x = x + (d + d_2) / 2 * dt
    return x


def _kdiff_euler_ancestral(model, x, sigmas, eta, g):
    """k_diffusion.sampling.sample_euler_ancestral with get_ancestral_step(sigma, sigma_next, eta)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * torch.ones(len(x), dtype=x.dtype))
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - denoised) / s * (down - s)
        if s_next > 0:
            x = x + torch.randn(x.shape, dtype=x.dtype, generator=g) * up
    return x


@pytest.mark.parametrize("kind", ["eps", "edm", "flow"])
def test_heun_euler_and_ddim_equal_k_diffusion(kind):
    """Heun on flow steps in flow time (the next test); its Euler is the same step in either variable."""
    den = PARAMS[kind].denoiser(exact_net(kind))
    x, sig = torch.randn(6, 1, dtype=torch.float64) * 10, karras_sigmas(7, 0.05, 10.0)
    levels = sig.tolist()
    if kind != "flow":
        torch.testing.assert_close(SAMPLERS["heun"](den, x, sig), _kdiff_heun(den, x, levels), rtol=0, atol=1e-12)
    torch.testing.assert_close(SAMPLERS["euler"](den, x, sig), _kdiff_heun(den, x, levels, False), rtol=0, atol=1e-12)
    for eta in (0.0, 0.5, 1.0):
        got = SAMPLERS["ddim"](den, x, sig, eta=eta, generator=torch.Generator().manual_seed(3))
        want = _kdiff_euler_ancestral(den, x, levels, eta, torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _paper_flow(net, x, ts, second_order):
    """The online self-guidance paper's Algorithm 2 (Euler, x += (t' - t) v(x, t)) and its Heun, transcribed."""
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = net(x, torch.full((len(x),), t, dtype=x.dtype))
        x_next = x + (t_next - t) * v
        if second_order:
            x_next = x + (t_next - t) / 2 * (v + net(x_next, torch.full((len(x),), t_next, dtype=x.dtype)))
        x = x_next
    return x


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_from_pure_noise_equals_the_papers_algorithm_2(sampler):
    """The flow grid starts at t = 0 (sigma = inf); Euler and Heun through the contract step in flow time and
    equal the velocity-space Algorithm 2 (and its Heun) on the same noise, for a nonlinear velocity."""
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    net = lambda x, t: field(torch.cat([x, t[:, None].to(x.dtype)], 1))  # noqa: E731  a nonlinear velocity
    noise = torch.randn(8, 4, dtype=torch.float64)
    with torch.no_grad():
        want = _paper_flow(net, noise, flow_times(10, dtype=torch.float64), sampler == "heun")
        got = sample(PARAMS["flow"], net, noise, 10, sampler=sampler)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_flow_through_the_contract_is_as_accurate_as_flow_time_integration():
    """Issue 21: the exact flow of N(MU, S^2) data from t = 0 is MU + sqrt(S^2 + s^2) eps. At 20 steps Heun and
    dopri5 through ``sample`` reach the flow-time integrators' accuracy (sigma-space Heun with a fixed Euler
    first step was 1.3e-2 from exact, dopri5 5.6e-4)."""
    noise = torch.randn(4096, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = MU + noise * math.sqrt(S**2 + SIGMA_MIN**2)
    err = {name: (sample(PARAMS["flow"], exact_net("flow"), noise, 20, sampler=name) - exact).abs().max().item()
           for name in ("heun", "dopri5")}
    assert err["heun"] <= 2e-3 and err["dopri5"] <= 1e-4, err


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_one_step_from_pure_noise(sampler):
    """One step from t = 0 to 1: the first-order samplers take the limit step (x0_hat = MU at t = 0, re-noised
    to sigma_1 = s), Heun its trapezoid in t, dopri5 integrates to its tolerance."""
    noise = torch.randn(4, 1, dtype=torch.float64)
    out = sample(PARAMS["flow"], exact_net("flow"), noise, 1, sampler=sampler)
    exact = MU + noise * math.sqrt(S**2 + SIGMA_MIN**2)
    want = {"dopri5": exact, "heun": MU + (0.5 + SIGMA_MIN) * noise}.get(sampler, MU + SIGMA_MIN * noise)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        flow_times(0)


def test_coeffs_keep_the_times_dtype():
    t64 = torch.tensor([1.0, 500.5, 999.0], dtype=torch.float64)
    for param in PARAMS.values():
        assert param.coeffs(t64)[0].dtype == torch.float64 and param.coeffs(t64.float())[1].dtype == torch.float32
    x0, eps = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    x_t = _ab("eps", t64)[0].view(-1, 1) * x0 + _ab("eps", t64)[1].view(-1, 1) * eps
    got = PARAMS["eps"].x0_eps(x_t, eps, t64)[0]  # exact eps: x0 back to float64 round-off, not float32's 1e-5
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-12)
