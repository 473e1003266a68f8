"""The attention adapters (sgengine.guidance.adapters) on tiny random diffusers models of every family.

References are independent of the adapters: the attention maps are materialised here from the
q, k, v that diffusers' own processors hand to ``scaled_dot_product_attention`` (recorded), or, for
Sana's linear attention, from the layer's own projections; PAG is compared with diffusers' PAG
processors; SEG's blur with torchvision's.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny_dit import MODELS, TEXT, flux_inputs

diffusers = pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")
from diffusers.models import attention_processor as ap  # noqa: E402
from torchvision.transforms.functional import gaussian_blur  # noqa: E402

from sgengine.guidance import capture_key_mass, list_attention_layers  # noqa: E402
from sgengine.guidance.adapters import adapter_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny ops

# (model, layer, token grid, where the image tokens sit among the layer's tokens)
CASES = [
    ("sd3", "transformer_blocks.1.attn", (12, 20), "first"),      # [img; txt]
    ("sd3", "transformer_blocks.2.attn", (12, 20), "first"),      # context_pre_only block
    ("sd35", "transformer_blocks.0.attn", (12, 20), "first"),     # rms qk-norm
    ("sd35", "transformer_blocks.0.attn2", (12, 20), "all"),      # SD3.5's image-only attention
    ("flux", "transformer_blocks.0.attn", (12, 20), "last"),      # double-stream [txt; img]
    ("flux", "single_transformer_blocks.1.attn", (12, 20), "last"),  # single-stream [txt; img]
    ("pixart", "transformer_blocks.1.attn1", (12, 20), "all"),
    ("dit", "transformer_blocks.1.attn1", (8, 8), "all"),          # diffusers' DiT runs square latents only
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", (24, 40), "all"),
    ("sana", "transformer_blocks.1.attn1", (12, 20), "all"),       # linear attention
]


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, (build, _) in MODELS.items()}


def _inputs(name):
    torch.manual_seed(1)
    return MODELS[name][1]()


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@contextlib.contextmanager
def _recording(model, layer, mask=None):
    """Record (q, k, v) of every SDPA call made inside ``layer`` (diffusers' own processor); with
    ``mask(q, k)``, those calls also run with that additive attention mask."""
    module, calls, inside = model.get_submodule(layer), [], [False]
    sdpa = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        if not inside[0]:
            return sdpa(*args, **kwargs)
        calls.append((q, k, v))
        return sdpa(q, k, v, attn_mask=mask(q, k)) if mask is not None else sdpa(*args, **kwargs)
    hooks = [module.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             module.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    torch.nn.functional.scaled_dot_product_attention = record
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


def _image_slice(where, n, n_img):
    return {"first": slice(0, n_img), "last": slice(n - n_img, n), "all": slice(0, n)}[where]


def _softmax_mass(q, k, where, grid):
    """Materialised map in float64 -> mass of the image queries at the image keys (B, h, w)."""
    a = torch.softmax(q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    img = _image_slice(where, a.shape[-1], grid[0] * grid[1])
    return a[:, :, img, :].sum(2).mean(1)[:, img].reshape(a.shape[0], *grid).float()


def _linear_mass(model, layer, inputs, grid):
    """Sana: A_ij = relu(q_i).relu(k_j) / (relu(q_i).sum_j relu(k_j) + 1e-15), materialised."""
    attn, seen = model.get_submodule(layer), {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
             for n in ("to_q", "to_k")]
    _run(model, inputs)
    for h in hooks:
        h.remove()
    q, k = (F.relu(seen[n].double().unflatten(-1, (attn.heads, -1)).transpose(1, 2)) for n in ("to_q", "to_k"))
    scores = q @ k.transpose(-2, -1)
    a = scores / (q @ k.sum(2, keepdim=True).transpose(-2, -1) + 1e-15)
    return a.sum(2).mean(1).reshape(q.shape[0], *grid).float()


@pytest.mark.parametrize("name,layer,grid,where", CASES)
def test_key_mass_equals_the_materialised_map_at_a_non_square_latent(models, name, layer, grid, where):
    model, inputs = models[name], _inputs(name)
    assert layer in list_attention_layers(model)
    if name == "sana":
        want = _linear_mass(model, layer, inputs, grid)
        plain = _run(model, inputs)
    else:
        with _recording(model, layer) as calls:
            plain = _run(model, inputs)
        (q, k, _), = calls
        want = _softmax_mass(q, k, where, grid)
    with capture_key_mass(model, layer) as cap:
        got = _run(model, inputs)
    assert cap.grid == grid and cap.mass.shape == (2, *grid)
    torch.testing.assert_close(cap.mass, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    if where == "all" and name != "sana":  # pure self-attention: every query's unit mass lands on image keys
        torch.testing.assert_close(cap.mass.mean(dim=(1, 2)), torch.ones(2))


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_rows_limit_the_capture_to_part_of_the_batch(models, name):
    """SAG captures the unconditional half of a CFG batch: rows=slice(1, 2) gives that sample's mass,
    and every sample's output stays the plain one."""
    model, inputs = models[name], _inputs(name)
    layer = adapter_for(model).default_layer
    plain = _run(model, inputs)
    with capture_key_mass(model, layer) as cap:
        _run(model, inputs)
        full = cap.mass
        cap.rows = slice(1, 2)
        got = _run(model, inputs)
    assert cap.mass.shape == (1, *full.shape[1:])
    torch.testing.assert_close(cap.mass, full[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


# --- PAG: identity attention on the image-image block ---------------------------------------------

def _joint_states(dim=16, n=12, batch=2):
    torch.manual_seed(2)
    return torch.randn(batch, n, dim), torch.randn(batch, TEXT, dim)


@contextlib.contextmanager
def _processor(module, processor):
    original = module.processor
    module.set_processor(processor)
    try:
        yield
    finally:
        module.set_processor(original)


def _diffusers_pag(attn, h, c=None):
    """diffusers' PAG processor on [h; h]: the perturbed half."""
    pag = ap.PAGJointAttnProcessor2_0() if c is not None else ap.PAGIdentitySelfAttnProcessor2_0()
    with _processor(attn, pag), torch.no_grad():
        context = {} if c is None else {"encoder_hidden_states": torch.cat([c, c])}
        out = attn(hidden_states=torch.cat([h, h]), **context)
    return tuple(o.chunk(2)[1] for o in out) if c is not None else out.chunk(2)[1]


def _ours(model, layer, mode, h, c=None, rows=None, sigma=None):
    attn = model.get_submodule(layer)
    with adapter_for(model).perturb(layer, mode, sigma=sigma) as hook, torch.no_grad():
        hook.rows = rows
        return attn(hidden_states=h, **({} if c is None else {"encoder_hidden_states": c}))


def test_pag_on_sd3_equals_diffusers_pag_processors(models):
    h, c = _joint_states()
    attn = models["sd3"].get_submodule("transformer_blocks.1.attn")
    for got, want in zip(_ours(models["sd3"], "transformer_blocks.1.attn", "pag", h, c), _diffusers_pag(attn, h, c)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # [uncond; cond; perturbed] as PAGCFGJointAttnProcessor2_0 takes it: ours perturbs rows 2: only
    h3, c3 = _joint_states(batch=3)
    with _processor(attn, ap.PAGCFGJointAttnProcessor2_0()), torch.no_grad():
        want = attn(hidden_states=h3, encoder_hidden_states=c3)
    got = _ours(models["sd3"], "transformer_blocks.1.attn", "pag", h3, c3, rows=slice(2, 3))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _identity_block(where, n_img):
    """An additive mask whose image-image block is the identity: PAG's substitution."""
    def mask(q, k):
        m, img = torch.zeros(q.shape[2], k.shape[2]), _image_slice(where, k.shape[2], n_img)
        m[img, img] = float("-inf")
        m[img, img].fill_diagonal_(0)
        return m
    return mask


def test_pag_on_sd35_keeps_the_qk_norm_that_diffusers_pag_drops(models):
    """SD3.5 (qk_norm="rms_norm"): ours is the model's own JointAttnProcessor2_0 path with the identity
    substitution; diffusers' PAGJointAttnProcessor2_0 skips norm_q / norm_k / norm_added_*, so it is not."""
    h, c = _joint_states()
    model, layer = models["sd35"], "transformer_blocks.0.attn"
    attn = model.get_submodule(layer)
    assert attn.norm_q is not None and type(attn.processor).__name__ == "JointAttnProcessor2_0"
    with _recording(model, layer, _identity_block("first", h.shape[1])), torch.no_grad():
        reference = attn(hidden_states=h, encoder_hidden_states=c)
    ours, theirs = _ours(model, layer, "pag", h, c), _diffusers_pag(attn, h, c)
    for o, r, t in zip(ours, reference, theirs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert (t - r).abs().max() > 1e-2  # the documented defect of diffusers' processor


@pytest.mark.parametrize("name,layer", [("pixart", "transformer_blocks.1.attn1"),
                                        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
                                        ("sd35", "transformer_blocks.0.attn2")])
def test_pag_on_self_attention_equals_diffusers_identity_processor(models, name, layer):
    attn = models[name].get_submodule(layer)
    h = _joint_states(dim=attn.to_q.in_features, n=240)[0]
    torch.testing.assert_close(_ours(models[name], layer, "pag", h), _diffusers_pag(attn, h), rtol=1e-5, atol=1e-5)


def test_pag_on_sana_equals_diffusers_identity_linear_processor(models):
    layer = "transformer_blocks.1.attn1"
    attn = models["sana"].get_submodule(layer)
    h = _joint_states(dim=attn.to_q.in_features, n=240)[0]
    with _processor(attn, ap.PAGIdentitySanaLinearAttnProcessor2_0()), torch.no_grad():
        want = attn(hidden_states=torch.cat([h, h])).chunk(2)[1]
    torch.testing.assert_close(_ours(models["sana"], layer, "pag", h), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,layer,where", [("sd35", "transformer_blocks.1.attn", "first"),
                                              ("flux", "transformer_blocks.0.attn", "last"),
                                              ("flux", "single_transformer_blocks.0.attn", "last"),
                                              ("pixart", "transformer_blocks.0.attn1", "all")])
def test_pag_is_the_models_own_forward_with_the_identity_block(models, name, layer, where):
    """Whole model at 24x40: PAG on one layer equals the unhooked model whose layer's SDPA gets the
    identity image-image block (q / k norms and RoPE included, text keys kept)."""
    model, inputs = models[name], _inputs(name)
    with _recording(model, layer, _identity_block(where, 12 * 20)):
        want = _run(model, inputs)
    with adapter_for(model).perturb(layer, "pag"):
        got = _run(model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - _run(model, inputs)).abs().max() > 1e-3  # and it does perturb


# --- SEG: Gaussian blur of the image queries on their grid ------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 1e5])
@pytest.mark.parametrize("layer", ["single_transformer_blocks.1.attn", "transformer_blocks.0.attn"])
def test_seg_on_flux_blurs_the_image_queries_only_on_their_non_square_grid(models, layer, sigma):
    """Flux's sequence is [txt; img]: text queries and all keys / values stay, the 12x20 image-query
    grid gets torchvision's reflect-padded Gaussian blur (sigma > 9999.9: the mean query)."""
    model, inputs = models["flux"], _inputs("flux")
    with _recording(model, layer) as plain:
        _run(model, inputs)
    with adapter_for(model).perturb(layer, "seg", sigma=sigma) as hook, _recording(model, layer) as seg:
        _run(model, inputs)
    (q, k, v), (qs, ks, vs) = plain[0], seg[0]
    assert hook.grid == (12, 20) and torch.equal(ks, k) and torch.equal(vs, v)
    assert torch.equal(qs[:, :, :TEXT], q[:, :, :TEXT])  # the text queries are untouched
    img = q[:, :, TEXT:].transpose(-1, -2).reshape(2, -1, 12, 20)
    mean = img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    want = mean if sigma > 1e4 else gaussian_blur(img, [7, 7], [sigma] * 2)
    torch.testing.assert_close(qs[:, :, TEXT:], want.reshape(*q.shape[:2], q.shape[-1], -1).transpose(-1, -2),
                               rtol=1e-5, atol=1e-5)


# --- hooks leave the model as it was ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd35", "flux", "pixart", "dit", "sana", "unet"])
def test_inactive_hooks_are_bit_identical_and_close_restores_the_processor(models, name):
    model, inputs = models[name], _inputs(name)
    adapter, plain = adapter_for(model), _run(model, inputs)
    for layer in (adapter.default_layer, adapter.layers()[0]):
        module = model.get_submodule(layer)
        before = module.processor
        for attach in (lambda: adapter.capture(layer), lambda: adapter.perturb(layer, "pag"),
                       lambda: adapter.perturb(layer, "seg", sigma=2.0)):
            hook = attach()
            assert module.processor is not before
            with pytest.raises(ValueError, match="already has a guidance hook"):
                attach()
            hook.active = False
            assert torch.equal(_run(model, inputs), plain)
            hook.close()
            assert module.processor is before and torch.equal(_run(model, inputs), plain)


# --- bad input: one line each, naming the cause and the choice ---------------------------------------

def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_errors_name_the_cause_and_the_fix(models):
    with pytest.raises(TypeError) as err:
        adapter_for(torch.nn.Linear(2, 2))
    assert all(f in _one_line(err) for f in ("engine", "unet", "sd3", "flux", "pixart", "sana"))
    with pytest.raises(KeyError) as err:
        capture_key_mass(models["sd3"], "transformer_blocks.9.attn")
    assert "transformer_blocks.2.attn" in _one_line(err)
    for name, layer in (("pixart", "transformer_blocks.0.attn2"), ("sana", "transformer_blocks.0.attn2"),
                        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2"), ("sd3", "transformer_blocks.0")):
        with pytest.raises(ValueError, match="no image-image attention") as err:
            capture_key_mass(models[name], layer)
        _one_line(err)
    with capture_key_mass(models["sd3"], "transformer_blocks.1.attn"), pytest.raises(ValueError) as err:
        _run(models["sd3"], MODELS["sd3"][1](latent=(25, 40)))
    assert "not divisible by the patch size 2" in _one_line(err)
    bad = flux_inputs()
    bad["img_ids"] = bad["img_ids"][:200]
    with capture_key_mass(models["flux"], "transformer_blocks.0.attn"), pytest.raises(ValueError) as err:
        _run(models["flux"], bad)
    assert "img_ids" in _one_line(err)
    with pytest.raises(ValueError, match="'pag' or 'seg'"):
        adapter_for(models["dit"]).perturb("transformer_blocks.0.attn1", "sag")
    with pytest.raises(ValueError, match="sigma > 0"):
        adapter_for(models["dit"]).perturb("transformer_blocks.0.attn1", "seg")


def test_a_processor_that_is_not_mirrored_is_refused_and_left_alone(models):
    attn = models["pixart"].get_submodule("transformer_blocks.0.attn1")
    with _processor(attn, ap.PAGIdentitySelfAttnProcessor2_0()):
        with pytest.raises(TypeError, match="runs PAGIdentitySelfAttnProcessor2_0.*set_default_attn_processor") as err:
            capture_key_mass(models["pixart"], "transformer_blocks.0.attn1")
        _one_line(err)
        assert type(attn.processor).__name__ == "PAGIdentitySelfAttnProcessor2_0"
    assert not models["pixart"]._forward_pre_hooks  # the failed attach removed its grid watcher too


def test_default_layers_are_the_documented_ones(models):
    want = {"sd3": "transformer_blocks.1.attn", "sd35": "transformer_blocks.1.attn",
            "flux": "single_transformer_blocks.0.attn", "pixart": "transformer_blocks.1.attn1",
            "dit": "transformer_blocks.1.attn1", "sana": "transformer_blocks.1.attn1",
            "unet": "mid_block.attentions.0.transformer_blocks.0.attn1"}
    assert {name: adapter_for(m).default_layer for name, m in models.items()} == want
    assert adapter_for(models["flux"]).patch == 2 and adapter_for(models["sd3"]).patch == 2


# --- the engine's SAG drives a transformer through the registry ---------------------------------------

class _Denoiser(torch.nn.Module):
    """A flow-matching velocity network around a diffusers transformer: net(x, t) (t in [0, 1])."""

    def __init__(self, transformer, extra):
        super().__init__()
        self.transformer, self.extra = transformer, extra

    def forward(self, x, t):
        return self.transformer(hidden_states=x, timestep=t * 1000, **self.extra).sample[:, : x.shape[1]]


@pytest.mark.parametrize("name", ["sd3", "pixart", "sana"])
def test_engine_sag_runs_on_a_transformer_through_the_registry(models, name):
    from sgengine.guidance import SAG, parameterization_for
    from sgengine.kernels import sag_degrade
    inputs = _inputs(name)
    x = inputs.pop("hidden_states")
    inputs.pop("timestep")
    net, param, t = _Denoiser(models[name], inputs), parameterization_for("flow"), torch.tensor([0.4, 0.7])
    layer = adapter_for(net).default_layer  # unwrapped through .transformer
    with torch.no_grad():
        plain = net(x, t)
        with SAG(net, param, layer, scale=0.0) as sag:
            assert torch.equal(sag(x, t), plain)
        with SAG(net, param, layer, scale=0.5, blur=(3, 1.0)) as sag:
            got = sag(x, t)
        with capture_key_mass(net, layer) as cap:
            pred = net(x, t)
        x0, eps = param.x0_eps(x, pred, t)
        share = cap.mass / cap.mass.mean(dim=(1, 2), keepdim=True)
        assert 0 < (share > 1).float().mean() < 1
        x_deg = sag_degrade(x, x0, eps, share, *param.coeffs(t), 1.0, 3, 1.0)
        gain = param.input_gain(t).view(-1, 1, 1, 1)
        want = pred + 0.5 * (pred - net(x_deg, t) - gain * (x - x_deg))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the engine's own attention: PAG and SEG leave the U-ViT's time / condition / CLS tokens alone ------

def test_engine_pag_and_seg_act_on_the_uvit_image_block_only():
    from sgengine.models.uvit import UVIT_PRESETS, UViT
    torch.manual_seed(0)
    net, layer, extras = UViT(UVIT_PRESETS["uvit-tiny"]).eval(), "mid_block.attn", 3
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    module, original = net.get_submodule(layer), net.get_submodule(layer).attend

    def masked(q, k, v):
        m = torch.zeros(q.shape[2], k.shape[2])
        m[extras:, extras:] = float("-inf")
        m[extras:, extras:].fill_diagonal_(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    def blurred(q, k, v):
        img = q[:, :, extras:].transpose(-1, -2).reshape(2, -1, 4, 4)
        img = gaussian_blur(img, [3, 3], [1.0, 1.0]).reshape(*q.shape[:2], q.shape[-1], -1).transpose(-1, -2)
        return F.scaled_dot_product_attention(torch.cat([q[:, :, :extras], img], dim=2), k, v)
    for mode, reference in (("pag", masked), ("seg", blurred)):
        with torch.no_grad():
            module.attend = reference
            want = net(x, t)
            module.attend = original
            with adapter_for(net).perturb(layer, mode, sigma=1.0) as hook:
                got = net(x, t)
        assert hook.grid == (4, 4) and module.attend is original
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
