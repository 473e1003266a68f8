"""Tiny randomly initialised diffusers denoisers of every attention family (configs only, no hub),
with inputs at a non-square latent: 24x40 latent pixels (a 12x20 token grid at patch 2) unless a
model only runs square latents (diffusers' DiT unpatchifies with h = w). Shared by the adapter
tests and any test that needs a small SD3 / Flux / PixArt / DiT / Sana / UNet denoiser."""
from __future__ import annotations

import torch

B, TEXT, LATENT = 2, 5, (24, 40)


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def sd3(qk_norm=None, dual=()):
    import diffusers
    return _seeded(lambda: diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=dual))


def sd3_inputs(latent=LATENT):
    return dict(hidden_states=torch.randn(B, 4, *latent), encoder_hidden_states=torch.randn(B, TEXT, 16),
                pooled_projections=torch.randn(B, 8), timestep=torch.tensor([10.0, 500.0]))


def flux():
    import diffusers
    return _seeded(lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=[2, 2, 4]))


def flux_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 3) ids as FluxPipeline builds them: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(latent=LATENT):
    h, w = latent[0] // 2, latent[1] // 2  # the pipeline's 2x2 packing
    return dict(hidden_states=torch.randn(B, h * w, 4), encoder_hidden_states=torch.randn(B, TEXT, 16),
                pooled_projections=torch.randn(B, 8), timestep=torch.tensor([0.1, 0.5]), img_ids=flux_ids(h, w),
                txt_ids=torch.zeros(TEXT, 3))


def pixart():
    import diffusers
    return _seeded(lambda: diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))


def pixart_inputs(latent=LATENT):
    return dict(hidden_states=torch.randn(B, 4, *latent), encoder_hidden_states=torch.randn(B, TEXT, 16),
                timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def dit():
    import diffusers
    return _seeded(lambda: diffusers.DiTTransformer2DModel(
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=8,
        attention_bias=True, num_layers=2, norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2,
        sample_size=8))


def dit_inputs(latent=(16, 16)):
    return dict(hidden_states=torch.randn(B, 4, *latent), timestep=torch.tensor([10, 500]),
                class_labels=torch.tensor([1, 2]))


def sana():
    import diffusers
    return _seeded(lambda: diffusers.SanaTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=32))


def sana_inputs(latent=LATENT):
    return dict(hidden_states=torch.randn(B, 4, *latent), encoder_hidden_states=torch.randn(B, TEXT, 16),
                timestep=torch.tensor([10, 500]))


def unet():
    """An SD-style UNet2DConditionModel (attn1 self-attention, attn2 cross-attention)."""
    import diffusers
    return _seeded(lambda: diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, layers_per_block=1))


def unet_inputs(latent=LATENT):
    return dict(sample=torch.randn(B, 4, *latent), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(B, TEXT, 16))


MODELS = {  # name: (model factory, inputs factory)
    "sd3": (sd3, sd3_inputs),
    "sd35": (lambda: sd3(qk_norm="rms_norm", dual=(0,)), sd3_inputs),
    "flux": (flux, flux_inputs),
    "pixart": (pixart, pixart_inputs),
    "dit": (dit, dit_inputs),
    "sana": (sana, sana_inputs),
    "unet": (unet, unet_inputs),
}
