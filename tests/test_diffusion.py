import torch

from sgengine.diffusion.ddpm import EpsilonLoss, predict_x0, q_sample
from sgengine.diffusion.param import eps_param
from sgengine.diffusion.samplers import sample
from sgengine.diffusion.schedules import alphas_cumprod, linear_betas, spaced_timesteps
from sgengine.guidance.cfg import CFG
from sgengine.models.unet import UNet, unet_config

ABAR = alphas_cumprod(linear_betas())


def _on_timesteps(sampler, net, x_T, ts, clip_x0=True, **options):
    """``sampler`` on an eps network at diffusers-style descending timesteps from x_T (sample()'s unit noise)."""
    param = eps_param(ABAR)
    sigmas = torch.cat([param.sigma(torch.as_tensor(ts).double()), torch.zeros(1, dtype=torch.float64)])
    return sample(param, net, x_T, sigmas=sigmas, sampler=sampler, clip_x0=clip_x0, **options)


def _net():
    torch.manual_seed(0)
    net = UNet(unet_config("tiny", num_classes=4)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def test_linear_schedule_constants():
    b = linear_betas()
    assert b.shape == (1000,) and abs(float(b[0]) - 1e-4) < 1e-12 and abs(float(b[-1]) - 0.02) < 1e-12
    assert float(ABAR[-1]) < 1e-4


def test_q_sample_and_predict_x0_invert():
    x0, eps = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 10, 300, 700, 999])
    torch.testing.assert_close(predict_x0(q_sample(x0, t, eps, ABAR), eps, t, ABAR), x0, atol=2e-3, rtol=1e-4)


def test_ddim_eta0_is_deterministic_and_w0_equals_plain():
    net, x = _net(), torch.randn(3, 1, 8, 8)
    y = torch.eye(4)[:3]
    ts = spaced_timesteps(1000, 8)

    def run(eta, seed):
        return _on_timesteps("ddim", CFG(net, 0.0, y=y), x, ts, eta=eta,
                             generator=torch.Generator().manual_seed(seed))
    # The same two seeds: with eta > 0 they give different samples, so eta = 0 must be drawing no noise.
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))
    a = run(0.0, 1)
    torch.testing.assert_close(a, run(0.0, 2), rtol=0, atol=0)
    plain = _on_timesteps("ddim", lambda x, t: net(x, t), x, ts)
    torch.testing.assert_close(a, plain, rtol=0, atol=0)


def test_cfg_w0_is_one_pass_of_b():
    net, calls = _net(), []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    CFG(net, 0.0, y=torch.eye(4)[:3])(torch.randn(3, 1, 8, 8), torch.full((3,), 5.0))
    CFG(net, 2.0, y=torch.eye(4)[:3])(torch.randn(3, 1, 8, 8), torch.full((3,), 5.0))
    hook.remove()
    assert calls == [3, 6]  # w=0: no doubling; w=2: ONE batched forward of 2B


def test_batched_cfg_equals_two_separate_forwards():
    net, x, t, y, w = _net(), torch.randn(3, 1, 8, 8), torch.tensor([3.0, 400.0, 900.0]), torch.eye(4)[1:], 2.5
    eps_u = net(x, t, y=y, null=torch.ones(3, dtype=torch.bool))
    eps_c = net(x, t, y=y)
    torch.testing.assert_close(CFG(net, w, y=y)(x, t), eps_u + w * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_ddpm_ancestral_uses_noise_and_matches_gaussian_data():
    s = 0.5  # data ~ N(0, s^2): the exact eps-predictor is sqrt(1-a) x / (a s^2 + 1 - a)

    def eps(x, t):
        a = ABAR[t.long()].float().view(-1, 1)
        return (1 - a).sqrt() * x / (a * s * s + 1 - a)

    x = torch.randn(20000, 1)
    ts = spaced_timesteps(1000, 200)
    out = _on_timesteps("ddpm", eps, x, ts, clip_x0=False, generator=torch.Generator().manual_seed(0))
    assert abs(out.std().item() - s) < 0.03
    det = _on_timesteps("ddim", eps, x, ts, clip_x0=False)
    assert abs(det.std().item() - s) < 0.03
    assert not torch.allclose(out, det)


def test_epsilon_loss_is_zero_for_the_true_noise():
    class Oracle:
        def __call__(self, x_t, t, **_):
            return self.eps

    loss = EpsilonLoss()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 8, 8)
    oracle = Oracle()
    torch.randint(0, 1000, (4,), generator=g2)
    oracle.eps = torch.randn(x0.shape, generator=g2)
    assert float(loss(oracle, x0, generator=g1).max()) == 0.0
