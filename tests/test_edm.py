"""EDM: preconditioning, loss, time steps and the Heun/Euler samplers (Karras et al. 2022).

The reference formulas are transcribed here independently of sgengine.diffusion.edm. The
samplers are checked on the exact denoiser of Gaussian data N(mu, s^2 I), for which
D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2) and the probability-flow ODE
dx/dsigma = (x - D) / sigma has the closed form x(sigma) - mu ∝ sqrt(s^2 + sigma^2).
"""
import dataclasses
import math

import pytest
import torch

from sgengine.diffusion.edm import (
    EDM_PRESETS, EDMConfig, EDMLoss, EDMPrecond, edm_renoise_coeffs, karras_sigmas, x0_eps_from_denoised,
)
from sgengine.diffusion.samplers import euler, heun

MU, S = 0.3, 0.5


def gaussian_denoiser(mu=MU, s=S):
    calls = []

    def denoise(x, sigma):
        calls.append(sigma.clone())
        sig2 = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    denoise.calls = calls
    return denoise


def closed_form(x_start, sigma_start, sigma_end, mu=MU, s=S):
    return mu + (x_start - mu) * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_start**2)


class RecordingNet(torch.nn.Module):
    """F(x, t) = tanh(W x) + t: a fixed nonlinear map that records what it was called with."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 1)
        self.seen = {}

    def forward(self, x, t, y=None, layout=None, null=None):
        self.seen = {"x": x, "t": t, "y": y, "null": null}
        return torch.tanh(self.conv(x)) + t.view(-1, 1, 1, 1)


def paper_coeffs(sigma, sd):
    """EDM Table 1, 'Network and preconditioning' column."""
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / math.sqrt(sd**2 + sigma**2)
    c_in = 1 / math.sqrt(sigma**2 + sd**2)
    c_noise = math.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


# -------------------------------------------------------------------------------- preconditioning

@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_precond_matches_table_1(sd):
    net = RecordingNet()
    sigmas = [0.002, 0.7, 80.0]
    x = torch.randn(3, 3, 4, 4)
    y = torch.eye(3)
    D = EDMPrecond(net, sigma_data=sd)(x, torch.tensor(sigmas), y=y)
    for i, sigma in enumerate(sigmas):
        c_skip, c_out, c_in, c_noise = paper_coeffs(sigma, sd)
        F = torch.tanh(net.conv(c_in * x[i:i + 1])) + c_noise
        torch.testing.assert_close(D[i:i + 1], c_skip * x[i:i + 1] + c_out * F, rtol=1e-5, atol=1e-5)
        assert net.seen["t"][i].item() == pytest.approx(c_noise, rel=1e-6)
    assert net.seen["y"] is y


def test_precond_scalar_sigma_and_bad_shape():
    net = RecordingNet()
    x = torch.randn(2, 3, 4, 4)
    pre = EDMPrecond(net)
    torch.testing.assert_close(pre(x, 1.5), pre(x, torch.tensor([1.5, 1.5])))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        pre(x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(net, sigma_data=0)


# -------------------------------------------------------------------------------- loss

def test_loss_matches_paper_weighting():
    """EDM eq. 2 weighted by lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1)."""
    pre = EDMPrecond(RecordingNet(), sigma_data=0.5)
    seen = {}

    def denoiser(x, sigma, **cond):
        seen.update(x=x, sigma=sigma, cond=cond)
        return pre(x, sigma, **cond)

    y = torch.randn(4, 3, 4, 4)
    loss = EDMLoss()(denoiser, y, generator=torch.Generator().manual_seed(1), null=torch.zeros(4, dtype=torch.bool))
    assert loss.shape == (4,) and "null" in seen["cond"]
    for i in range(4):
        sigma = seen["sigma"][i].item()
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        D = pre(seen["x"][i:i + 1], sigma)
        assert loss[i].item() == pytest.approx(lam * (D - y[i:i + 1]).pow(2).mean().item(), rel=1e-4)
        # eq. 8: the same loss is an unweighted regression of F on (y - c_skip x) / c_out
        c_skip, c_out, c_in, c_noise = paper_coeffs(sigma, 0.5)
        F = torch.tanh(pre.net.conv(c_in * seen["x"][i:i + 1])) + c_noise
        target = (y[i:i + 1] - c_skip * seen["x"][i:i + 1]) / c_out
        assert loss[i].item() == pytest.approx((F - target).pow(2).mean().item(), rel=1e-3)


def test_loss_noise_distribution():
    """ln sigma ~ N(P_mean, P_std^2) and n / sigma ~ N(0, 1) (EDM Table 1, 'Training')."""
    seen = {}

    def denoiser(x, sigma):
        seen.update(x=x, sigma=sigma)
        return x

    y = torch.full((20000, 1, 2, 2), 0.25)
    EDMLoss(P_mean=-0.4, P_std=0.8)(denoiser, y, generator=torch.Generator().manual_seed(2))
    log_sigma = seen["sigma"].log()
    se = 0.8 / math.sqrt(len(y))
    assert abs(log_sigma.mean().item() + 0.4) < 5 * se
    assert abs(log_sigma.std().item() - 0.8) < 5 * se
    z = (seen["x"] - y) / seen["sigma"].view(-1, 1, 1, 1)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_loss_reproducible_with_generator():
    net = EDMPrecond(RecordingNet())
    y = torch.randn(3, 3, 4, 4)
    a = EDMLoss()(net, y, generator=torch.Generator().manual_seed(5))
    b = EDMLoss()(net, y, generator=torch.Generator().manual_seed(5))
    c = EDMLoss()(net, y, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# -------------------------------------------------------------------------------- time steps

def test_karras_sigmas_eq5():
    smin, smax, rho, n = 0.002, 80.0, 7.0, 18
    s = karras_sigmas(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s[-1] == 0
    for i in range(n):
        ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert s[i].item() == pytest.approx(ref, rel=1e-12)
    assert (s[1:] < s[:-1]).all()
    assert karras_sigmas(1, smin, smax, rho).tolist() == [smax, 0.0]


@pytest.mark.parametrize("args", [(0,), (5, 0.0), (5, 1.0, 0.5), (5, 0.002, 80.0, 0.0)])
def test_karras_sigmas_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        karras_sigmas(*args)


# -------------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("sampler, evals", [(heun, lambda n: 2 * n - 1), (euler, lambda n: n)])
@pytest.mark.parametrize("n", [1, 2, 18])
def test_number_of_denoiser_evaluations(sampler, evals, n):
    denoise = gaussian_denoiser()
    x = torch.randn(2, 1, 2, 2) * 80
    sampler(denoise, x, karras_sigmas(n), S_churn=10.0, generator=torch.Generator().manual_seed(0))
    assert len(denoise.calls) == evals(n)
    assert all(c.shape == (2,) and (c > 0).all() for c in denoise.calls)


def test_heun_converges_to_closed_form_at_second_order():
    sigma_max = 10.0
    x = torch.linspace(-20, 20, 9, dtype=torch.float64).view(9, 1, 1, 1)

    def error(sampler, n):
        sig = karras_sigmas(n, 0.002, sigma_max)
        out = sampler(gaussian_denoiser(), x, sig[:-1])  # stop at sigma_min: the ODE is smooth there
        return (out - closed_form(x, sigma_max, sig[-2].item())).abs().max().item()

    heun_errs = [error(heun, n) for n in (8, 16, 32)]
    assert heun_errs[1] < heun_errs[0] / 3 and heun_errs[2] < heun_errs[1] / 3  # ~4x per halving: 2nd order
    euler_errs = [error(euler, n) for n in (64, 128)]
    assert euler_errs[1] > euler_errs[0] / 2.5  # ~2x per halving: 1st order
    assert heun_errs[2] < euler_errs[1]  # Heun with 32 steps beats Euler with 128
    fine_euler = euler(gaussian_denoiser(), x, karras_sigmas(4096, 0.002, sigma_max))
    heun_128 = heun(gaussian_denoiser(), x, karras_sigmas(128, 0.002, sigma_max))
    heun_512 = heun(gaussian_denoiser(), x, karras_sigmas(512, 0.002, sigma_max))
    torch.testing.assert_close(heun_128, fine_euler, atol=1e-3, rtol=0)
    torch.testing.assert_close(heun_512, closed_form(x, sigma_max, 0.0), atol=5e-5, rtol=0)  # down to sigma = 0


@pytest.mark.parametrize("S_churn", [0.0, 40.0])
def test_samples_have_the_data_mean_and_std(S_churn):
    """From the exact prior at sigma_max, the sampler must land on N(mu, s^2 I). (With the preset's 18
    steps the truncation error alone leaves the std ~5% off on this target, hence 64 steps.)"""
    g = torch.Generator().manual_seed(3)
    cfg = dataclasses.replace(EDM_PRESETS["cifar-cedm"], steps=64)
    x = MU + math.sqrt(S**2 + cfg.sigma_max**2) * torch.randn(2000, 1, 4, 4, generator=g)
    out = heun(gaussian_denoiser(), x, cfg.sigmas(), S_churn=S_churn, generator=g)
    se = S / math.sqrt(out.numel())
    assert abs(out.mean().item() - MU) < 6 * se + 1e-3
    assert out.std().item() == pytest.approx(S, rel=0.02)


def test_churn_is_reproducible_and_deterministic_without_it():
    x = torch.randn(3, 1, 2, 2) * 80
    sig = karras_sigmas(6)

    def run(seed, churn):
        return heun(gaussian_denoiser(), x, sig, S_churn=churn, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0, 30.0), run(0, 30.0))
    assert not torch.allclose(run(0, 30.0), run(1, 30.0))
    torch.testing.assert_close(run(0, 0.0), run(1, 0.0))


def test_sampler_keeps_float64_and_promotes_half():
    den = gaussian_denoiser()
    x64 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    assert heun(den, x64, karras_sigmas(3), progress=True).dtype == torch.float64
    assert euler(den, torch.randn(2, 1, 2, 2).half(), karras_sigmas(3)).dtype == torch.float32


@pytest.mark.parametrize("sigmas", [[80.0], [1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [1.0, -0.5], [[1.0, 0.0]],
                                    [float("nan"), 0.0]])
def test_sampler_rejects_bad_sigmas(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        heun(gaussian_denoiser(), torch.zeros(1, 1, 2, 2), torch.tensor(sigmas))


def test_sampler_rejects_negative_churn():
    with pytest.raises(ValueError, match="S_churn"):
        euler(gaussian_denoiser(), torch.zeros(1, 1, 2, 2), karras_sigmas(2), S_churn=-1.0)


def test_cfg_wrapped_precond_drives_heun():
    """A guidance wrapper with the (x, sigma) signature plugs into the sampler unchanged."""
    from sgengine.guidance.cfg import CFG
    from sgengine.models.unet import UNET_PRESETS, UNet

    cfg = UNET_PRESETS["tiny"]
    net = UNet(type(cfg)(**{**cfg.__dict__, "num_classes": 3})).eval()
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    y = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    x = 80 * torch.randn(2, 1, 8, 8)
    out = heun(CFG(EDMPrecond(net), 1.5, y=y), x, karras_sigmas(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert calls == [4] * 5  # 2N - 1 evaluations, each one batched forward of 2B


# -------------------------------------------------------------------------------- SAG helpers, presets

def test_renoise_and_x0_eps_round_trip():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 20.0])
    a, b = edm_renoise_coeffs(sigma)
    x = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x, x0 + sigma.view(-1, 1, 1, 1) * eps)
    x0_hat, eps_hat = x0_eps_from_denoised(x, x0, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_cifar_preset_samples_with_heun_on_its_grid_and_rejects_bad_settings():
    cfg = EDM_PRESETS["cifar-cedm"]
    den = gaussian_denoiser()
    heun(den, torch.randn(2, 1, 2, 2) * cfg.sigma_max, cfg.sigmas())
    levels = [float(c[0]) for c in den.calls]
    assert len(levels) == 2 * cfg.steps - 1  # 18 steps: 35 evaluations (EDM Table 2)
    assert levels[0] == pytest.approx(cfg.sigma_max) and min(levels) == pytest.approx(cfg.sigma_min, rel=1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 10
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        EDMConfig(sigma_min=100.0)
    with pytest.raises(ValueError, match="P_std"):
        EDMConfig(P_std=0.0)
