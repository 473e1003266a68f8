"""sag_degrade: x_deg = a * (M * blur(x0) + (1 - M) * x0) + b * eps, both backends.

The truth is float64 with torchvision's Gaussian blur (what the SAG paper used) and
F.interpolate for the nearest upsampling, independent of the reference's conv2d chain.
"""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from sgengine.kernels._budget import max_err, rounding_floor, within_budget as budget_ok
from sgengine.kernels.sag_degrade import _sag_degrade_op, sag_degrade, sag_degrade_ref

BACKENDS = ("torch", "triton")
# (B, C, H, W), mass grid (h, w) or a flat h*w, kernel_size, sigma.
CASES = [
    ((1, 3, 24, 40), (6, 10), 9, 1.0),
    ((2, 4, 32, 32), 64, 31, 3.0),        # flat (B, h*w) mass, grid inferred as 8x8
    ((1, 4, 16, 48), (4, 12), 31, 9.0),   # r = 15: the largest reflect pad a 16-high image allows
    ((2, 1, 17, 23), (17, 23), 9, 2.0),   # attention at full resolution, odd sizes
]


def make_inputs(shape, grid, dtype=torch.float32):
    B = shape[0]
    x0, eps = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    a, b = torch.rand(B) + 0.1, torch.rand(B) + 0.1
    x_t = (a.view(B, 1, 1, 1) * x0.float() + b.view(B, 1, 1, 1) * eps.float()).to(dtype)
    mass = 2 * torch.rand((B, *grid) if isinstance(grid, tuple) else (B, grid))
    return x_t, x0, eps, mass, a, b


def truth(x0, eps, mass, a, b, H, W, threshold, kernel_size, sigma, on=None):
    B = x0.shape[0]
    if on is None:
        m = mass if mass.dim() == 3 else mass.view(B, int(mass.shape[1] ** 0.5), -1)
        on = F.interpolate((m > threshold).double()[:, None], size=(H, W), mode="nearest")
    blur = gaussian_blur(x0.double(), [kernel_size] * 2, [sigma] * 2)
    x0_bar = on * blur + (1 - on) * x0.double()
    return a.double().view(B, 1, 1, 1) * x0_bar + b.double().view(B, 1, 1, 1) * eps.double()


def within_budget(out, ref, want):
    """Error-budget rule. The floor is half an ulp of the output's dtype at its largest value:
    rounding the output once is unavoidable, and it alone decides the max error of a kernel that
    computes in fp32, while the reference's max may land on a lucky rounding."""
    return budget_ok(out, ref, want, rounding_floor(out.dtype, want) + 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, grid, k, sigma", CASES)
def test_fp32_matches_float64(shape, grid, k, sigma, backend):
    x_t, x0, eps, mass, a, b = make_inputs(shape, grid)
    out = sag_degrade(x_t, x0, eps, mass, a, b, 1.0, k, sigma, backend=backend)
    assert out.shape == x_t.shape and out.dtype == torch.float32
    want = truth(x0, eps, mass, a, b, *shape[2:], 1.0, k, sigma)
    assert max_err(out, want) <= 1e-5
    assert not torch.allclose(out, x_t, atol=1e-3)  # the mask did blur something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, grid, k, sigma", CASES[:2])
def test_low_precision_within_error_budget(shape, grid, k, sigma, dtype):
    x_t, x0, eps, mass, a, b = make_inputs(shape, grid, dtype)
    out = sag_degrade(x_t, x0, eps, mass, a, b, 1.0, k, sigma, backend="triton")
    ref = sag_degrade_ref(x_t, x0, eps, mass, a, b, 1.0, k, sigma)
    want = truth(x0, eps, mass, a, b, *shape[2:], 1.0, k, sigma)  # truth of the rounded inputs
    assert out.dtype == dtype
    assert within_budget(out, ref, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_off_everywhere_returns_x_t_exactly(backend, dtype):
    x_t, x0, eps, mass, a, b = make_inputs((2, 2, 24, 40), (6, 10), dtype)
    out = sag_degrade(x_t, x0, eps, mass, a, b, threshold=float(mass.max()), backend=backend)
    assert torch.equal(out, x_t)  # x_t = a * x0 + b * eps by construction, rounded alike


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_everywhere_is_the_blur(backend):
    x_t, x0, eps, mass, a, b = make_inputs((1, 2, 24, 40), (6, 10))
    out = sag_degrade(x_t, x0, eps, mass, a, b, threshold=-1.0, kernel_size=9, sigma=1.5,
                      backend=backend)
    want = truth(x0, eps, mass, a, b, 24, 40, -1.0, 9, 1.5, on=torch.ones(1, 1, 24, 40))
    assert max_err(out, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_masked_cell_leaves_the_rest_untouched(backend):
    # 48x48 image, 4x4 grid: one 12x12 cell on; tiles away from it skip the blur.
    x_t, x0, eps, mass, a, b = make_inputs((1, 1, 48, 48), (4, 4))
    mass = torch.zeros(1, 4, 4)
    mass[0, 2, 1] = 5.0
    out = sag_degrade(x_t, x0, eps, mass, a, b, backend=backend)
    on = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    on[..., 24:36, 12:24] = True
    assert torch.equal(out[~on], x_t[~on])
    assert not torch.allclose(out[on], x_t[on], atol=1e-3)
    assert max_err(out, truth(x0, eps, mass, a, b, 48, 48, 1.0, 9, 1.0)) <= 1e-5


def test_mixed_dtypes_strides_and_float_coefficients():
    x_t, x0, eps, mass, a, b = make_inputs((2, 2, 16, 24), (4, 6))
    x0 = x0.to(memory_format=torch.channels_last)
    eps, x_t = eps.bfloat16(), x_t.bfloat16()
    out = sag_degrade(x_t, x0, eps, mass, 0.7, 0.3, backend="triton")
    ref = sag_degrade_ref(x_t, x0, eps, mass, 0.7, 0.3)
    assert out.dtype == torch.bfloat16
    want = truth(x0, eps, mass, torch.full((2,), 0.7), torch.full((2,), 0.3), 16, 24, 1.0, 9, 1.0)
    assert within_budget(out, ref, want)


def test_auto_backend_on_cpu_is_the_reference():
    args = make_inputs((1, 3, 24, 40), (6, 10))
    assert torch.equal(sag_degrade(*args), sag_degrade_ref(*args))


@pytest.mark.parametrize("change, match", [
    (dict(mass=torch.rand(1, 5, 10)), "must divide"),
    (dict(mass=torch.rand(1, 7)), "cannot infer"),
    (dict(kernel_size=8), "odd"),
    (dict(sigma=0.0), "sigma > 0"),
    (dict(kernel_size=49), "at most 47"),
    (dict(x0=torch.randn(1, 3, 24, 41)), "one shape"),
    (dict(a=torch.rand(3)), "B=1"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors(change, match, backend):
    x_t, x0, eps, mass, a, b = make_inputs((1, 3, 24, 40), (6, 10))
    kw = dict(x_t=x_t, x0=x0, eps=eps, mass=mass, a=a, b=b) | change
    with pytest.raises(ValueError, match=match):
        sag_degrade(**kw, backend=backend)


def test_custom_op_traces():
    x_t, x0, eps, mass, a, b = make_inputs((1, 2, 16, 16), (4, 4))
    torch.library.opcheck(_sag_degrade_op, (x_t, x0, eps, mass, a, b, 1.0, 9, 1.0))
    compiled = torch.compile(lambda *t: sag_degrade(*t, backend="triton"),
                             backend="aot_eager", fullgraph=True)
    want = truth(x0, eps, mass, a, b, 16, 16, 1.0, 9, 1.0)
    assert max_err(compiled(x_t, x0, eps, mass, a, b), want) <= 1e-5


def test_triton_rejects_blurs_wider_than_its_tiles():
    x_t, x0, eps, mass, a, b = make_inputs((1, 1, 40, 40), (4, 4))
    with pytest.raises(ValueError, match="kernel_size 65 > 63 .* backend='torch'"):
        sag_degrade(x_t, x0, eps, mass, a, b, kernel_size=65, sigma=8.0, backend="triton")
    want = sag_degrade_ref(x_t, x0, eps, mass, a, b, kernel_size=65, sigma=8.0)
    assert torch.equal(sag_degrade(x_t, x0, eps, mass, a, b, kernel_size=65, sigma=8.0), want)
