"""U-ViT (sgengine/models/uvit.py): presets, long skips, null token, features, hooks."""
from __future__ import annotations

import einops
import pytest
import torch

from sgengine.diffusion.flow import FlowMatchingLoss
from sgengine.guidance.cfg import CFG
from sgengine.models.attention import MultiHeadAttention
from sgengine.models.uvit import UVIT_PRESETS, UViT, UViTConfig, unpatchify, uvit_config


def tiny(**overrides) -> UViT:
    return UViT(uvit_config("uvit-tiny", **overrides)).eval()


def inputs(model: UViT, b: int = 3):
    c = model.cfg
    x = torch.randn(b, c.in_channels, c.img_size, c.img_size)
    return x, torch.rand(b), torch.randn(b, c.condition_dim)


@pytest.mark.parametrize("preset", sorted(UVIT_PRESETS))
@pytest.mark.parametrize("b", [1, 2])
def test_preset_shapes_at_small_width(preset, b):
    model = UViT(uvit_config(preset, dim=32, depth=3, heads=2)).eval()
    x, t, y = inputs(model, b)
    v, feats = model(x, t, y, return_features=True)
    assert v.shape == x.shape
    assert feats["cls"].shape == (b, 32)
    assert feats["patches"].shape == (b, model.cfg.num_patches, 32)


def test_presets_follow_the_papers():
    m, l_ = UVIT_PRESETS["uvit-m"], UVIT_PRESETS["uvit-l"]
    assert (m.depth, m.dim, m.heads) == (17, 768, 12)
    assert (l_.depth, l_.dim, l_.heads, l_.patch, l_.img_size, l_.in_channels) == (21, 1024, 16, 2, 32, 4)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UViT(l_).parameters())
    assert abs(n_params / 287e6 - 1) < 0.02  # U-ViT-L: 287M parameters


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_long_skip_count_and_wiring(depth):
    model = tiny(depth=depth)
    n = (depth - 1) // 2
    skips = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.in_features == 2 * m.out_features]
    assert len(skips) == n == len(model.in_blocks) == len(model.out_blocks)
    assert sum(isinstance(m, MultiHeadAttention) for m in model.modules()) == depth
    in_outs, out_skips = [], []
    for blk in model.in_blocks:
        blk.register_forward_hook(lambda mod, args, out: in_outs.append(out))
    for blk in model.out_blocks:
        blk.register_forward_pre_hook(lambda mod, args: out_skips.append(args[1]))
    model(*inputs(model))
    # Out-block i reads in-block n-1-i: the shallowest in-block feeds the deepest out-block.
    assert all(s is o for s, o in zip(out_skips, reversed(in_outs)))
    assert len(out_skips) == n
    assert not any(isinstance(m, torch.nn.Linear) and m.in_features == 2 * m.out_features
                   for m in tiny(depth=depth, skip=False).modules())


def test_null_token_replaces_the_condition():
    model = tiny()
    x, t, y = inputs(model)
    y2 = torch.randn_like(y)
    all_null = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, y, null=all_null), model(x, t, y2, null=all_null))
    torch.testing.assert_close(model(x, t, y, null=all_null), model(x, t))  # y=None: null token
    assert not torch.allclose(model(x, t, y), model(x, t, y2))  # the condition is used ...
    assert not torch.allclose(model(x, t, torch.zeros_like(y)), model(x, t))  # ... 0 is not null
    mixed = torch.tensor([True, False, True])
    out = model(x, t, y, null=mixed)
    torch.testing.assert_close(out[mixed], model(x, t)[mixed])
    torch.testing.assert_close(out[~mixed], model(x, t, y)[~mixed])


def test_null_token_is_learned():
    model = UViT(uvit_config("uvit-tiny"))
    x, t, y = inputs(model)
    null = torch.tensor([True, False, False])
    FlowMatchingLoss()(model, x, y=y, null=null).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []  # every parameter, the null and CLS tokens included, gets a gradient


def test_time_is_an_input():
    model = tiny()
    x, t, y = inputs(model)
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))


def test_features_are_the_mid_block_tokens():
    model = tiny(depth=5)
    seen = {}
    model.mid_block.register_forward_hook(lambda mod, args, out: seen.update(mid=out))
    x, t, y = inputs(model)
    v, feats = model(x, t, y, return_features=True)
    torch.testing.assert_close(v, model(x, t, y))
    assert torch.equal(feats["cls"], seen["mid"][:, 2])
    assert torch.equal(feats["patches"], seen["mid"][:, 3:])
    model = tiny(depth=5, feature_block=0)
    model.in_blocks[0].register_forward_hook(lambda mod, args, out: seen.update(first=out))
    assert torch.equal(model(x, t, y, return_features=True)[1]["cls"], seen["first"][:, 2])


def test_attention_goes_through_the_attend_hook():
    model = tiny(depth=5)
    calls = []
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            inner = m.attend
            m.attend = lambda q, k, v, inner=inner: calls.append(q.shape) or inner(q, k, v)
    model(*inputs(model, 2))
    n_tokens = 3 + model.cfg.num_patches
    assert calls == [(2, model.cfg.heads, n_tokens, model.cfg.dim // model.cfg.heads)] * 5


def test_classifier_free_guidance_wrapper():
    model = tiny()
    x, t, y = inputs(model)
    guided = CFG(model, 1.4, y=y)(x, t)  # v = v_u + (1 + g)(v_c - v_u), g = 0.4
    v_u, v_c = model(x, t), model(x, t, y)
    torch.testing.assert_close(guided, v_u + 1.4 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_patch_level_condition():
    model = tiny(patch_cond=True)
    x, t, y = inputs(model)
    yp = torch.randn(3, model.cfg.num_patches, model.cfg.condition_dim)
    assert not torch.allclose(model(x, t, y, y_patch=yp), model(x, t, y))
    null = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, y, null=null, y_patch=yp), model(x, t, y, null=null))
    with pytest.raises(ValueError, match="patch_cond=True"):
        tiny()(x, t, y, y_patch=yp)


def test_conv_head_and_condition_width():
    model = tiny(conv=True, cond_dim=10, mlp_time_embed=True)
    x, t, _ = inputs(model)
    assert model(x, t, torch.randn(3, 10)).shape == x.shape


def test_unpatchify_matches_einops():
    tokens = torch.randn(2, 16, 2 * 2 * 3)
    expected = einops.rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=4, p1=2, p2=2)
    assert torch.equal(unpatchify(tokens, 3, 2), expected)


@pytest.mark.parametrize("kwargs", [dict(depth=4), dict(img_size=9), dict(dim=30, heads=4),
                                    dict(feature_block=5)])
def test_config_errors(kwargs):
    with pytest.raises(ValueError):
        UViTConfig(**{**dict(img_size=8, patch=2, dim=32, depth=5, heads=4), **kwargs})


def test_call_errors():
    model = tiny()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="layout"):
        model(x, t, y, layout=torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="cond_dim"):
        model(x, t, y[:, :5])
    with pytest.raises(KeyError):
        uvit_config("uvit-xxl")
