"""Flow matching on the constant-velocity path (sgengine/diffusion/flow.py)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from sgengine.diffusion import flow_param, sample
from sgengine.diffusion.flow import SIGMA_MIN, FlowMatchingLoss, flow_path, flow_times, renoise_coeffs, x0_eps_from_velocity

S = SIGMA_MIN


def test_path_end_points_and_velocity():
    x, eps = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x0_t, _ = flow_path(x, eps, torch.zeros(4))
    x1_t, u = flow_path(x, eps, torch.ones(4))
    torch.testing.assert_close(x0_t, eps)  # t = 0 is noise
    torch.testing.assert_close(x1_t, x + S * eps)  # t = 1 is data, up to the sigma_min floor
    torch.testing.assert_close(u, x - (1 - S) * eps)
    # u is the time derivative of x_t (central difference; the path is linear in t).
    t, h = torch.rand(4, dtype=torch.float64) * 0.8 + 0.1, 1e-3
    fd = (flow_path(x, eps, t + h)[0] - flow_path(x, eps, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, u)


def test_renoise_coeffs_rebuild_the_path():
    x, eps, t = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4), torch.rand(6)
    a, b = renoise_coeffs(t, S)
    assert a.shape == b.shape == (6,) and a.dtype == torch.float32
    torch.testing.assert_close(a[:, None, None, None] * x + b[:, None, None, None] * eps,
                               flow_path(x, eps, t, S)[0])


@pytest.mark.parametrize("sigma_min", [S, 0.0, 0.1])
def test_x0_eps_recovery_inverts_the_path(sigma_min):
    x, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, u = flow_path(x, eps, t, sigma_min)
    x0, e = x0_eps_from_velocity(x_t, u, t, sigma_min)
    torch.testing.assert_close(x0, x)
    torch.testing.assert_close(e, eps)


class _Recorder(nn.Module):
    """A 'network' returning a fixed function of what it is given, recording its inputs."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.seen = fn, {}

    def forward(self, x_t, t, **cond):
        self.seen.update(x_t=x_t, t=t, **cond)
        return self.fn(x_t, t)


def _twin_draw(x, seed):
    """The (t, eps) that FlowMatchingLoss draws from a generator seeded with ``seed``."""
    return FlowMatchingLoss().draw(x, torch.Generator().manual_seed(seed))


def test_loss_is_zero_for_the_exact_target_and_positive_otherwise():
    x = torch.randn(8, 3, 4, 4)
    t, eps = _twin_draw(x, 7)
    exact = _Recorder(lambda x_t, tt: x - (1 - S) * eps)
    loss = FlowMatchingLoss()(exact, x, generator=torch.Generator().manual_seed(7), y=torch.ones(8, 2))
    assert loss.shape == (8,) and torch.all(loss == 0)
    torch.testing.assert_close(exact.seen["t"], t)  # the net sees the drawn times ...
    torch.testing.assert_close(exact.seen["x_t"], flow_path(x, eps, t)[0])  # ... and x_t
    assert torch.equal(exact.seen["y"], torch.ones(8, 2))  # conditions pass through
    swapped = _Recorder(lambda x_t, tt: eps - x)  # the reversed-time convention is wrong here
    assert torch.all(FlowMatchingLoss()(swapped, x, generator=torch.Generator().manual_seed(7)) > 0.1)


def test_loss_of_a_zero_net_is_the_target_energy():
    x = torch.randn(5, 1, 3, 3)
    t, eps = _twin_draw(x, 3)
    loss = FlowMatchingLoss()(_Recorder(lambda x_t, tt: torch.zeros_like(x_t)), x,
                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, (x - (1 - S) * eps).pow(2).flatten(1).mean(1))


def test_loss_times_are_uniform_and_can_be_fixed():
    x = torch.zeros(4000, 1)
    net = _Recorder(lambda x_t, tt: x_t)
    FlowMatchingLoss()(net, x, generator=torch.Generator().manual_seed(0))
    t = net.seen["t"]
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean() - 0.5) < 0.02 and abs(t.var() - 1 / 12) < 0.005
    fixed = torch.full((4000,), 0.85)
    FlowMatchingLoss()(net, x, t=fixed)
    assert torch.equal(net.seen["t"], fixed)


def test_flow_times():
    ts = flow_times(4)
    torch.testing.assert_close(ts, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError):
        flow_times(0)


def _single_point_field(x_star):
    """The exact marginal velocity when the data is the one point x_star: straight paths."""
    def v(x, t):
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return x_star - (1 - S) * (x - t * x_star) / (1 - (1 - S) * t)
    return v


@pytest.mark.parametrize("sampler,steps", [("euler", 1), ("euler", 3), ("heun", 2), ("dopri5", 1)])
def test_straight_paths_are_integrated_exactly_from_noise_to_data(sampler, steps):
    """Through the one sampler contract, which steps in flow time on this objective: a straight path is
    integrated exactly by every ODE sampler. (float64: at t = 1 the field divides by 1 - (1-s) t = s = 1e-4.)"""
    x_star, eps = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    out = sample(flow_param(), _single_point_field(x_star), eps, steps, sampler=sampler, progress=True)
    expected = flow_path(x_star, eps, torch.ones(5, dtype=torch.float64))[0]  # x_star + s eps at t = 1
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


class _TinyField(nn.Module):
    def __init__(self, dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def test_euler_many_steps_matches_dopri5_on_a_tiny_model():
    pytest.importorskip("torchdiffeq")
    field, x = _TinyField(), torch.randn(4, 6)
    with torch.no_grad():
        ref = sample(flow_param(), field, x, 1, sampler="dopri5", rtol=1e-6, atol=1e-6)
        coarse, fine = (sample(flow_param(), field, x, n, sampler="euler") for n in (20, 1000))
        heun = sample(flow_param(), field, x, 100, sampler="heun")
    err_fine, err_coarse = (fine - ref).abs().max().item(), (coarse - ref).abs().max().item()
    assert err_fine < 5e-3 * ref.abs().max().item()
    assert err_fine < err_coarse / 20  # first order: 50x the steps, ~50x smaller error
    torch.testing.assert_close(heun, ref, rtol=1e-4, atol=1e-4)


def test_dopri5_without_torchdiffeq_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        sample(flow_param(), _TinyField(), torch.randn(2, 6), 1, sampler="dopri5")
