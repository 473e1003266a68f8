"""Tiny random diffusers pipelines built from configs (no hub, no text encoders, no VAE where the
pipeline allows): the prompt is given as random embeddings, the output as latents. Each builder
returns (pipe, kwargs of one call at a non-square latent, except DiT whose pipeline is square)."""
from __future__ import annotations

import torch

H, W = 8, 12  # latent rows x columns (non-square); pixels = 8x (the pipelines' VAE factor without a VAE)


def _seeded(seed: int = 0):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _embeds(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sd3(qk_norm=None, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    _seeded()
    net = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=64, out_channels=4, qk_norm=qk_norm, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    kw = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), negative_prompt_embeds=_embeds(1, 7, 32, seed=2),
              pooled_prompt_embeds=_embeds(1, 64, seed=3), negative_pooled_prompt_embeds=_embeds(1, 64, seed=4),
              height=8 * H, width=8 * W)
    return pipe, kw


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    _seeded()
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                 axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=net, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    kw = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), pooled_prompt_embeds=_embeds(1, 32, seed=3),
              height=8 * H, width=8 * W, guidance_scale=3.5)
    return pipe, kw


def pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    _seeded()
    net = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                   caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                                   attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(transformer=net, scheduler=DPMSolverMultistepScheduler(), vae=None,
                               text_encoder=None, tokenizer=None)
    mask = torch.ones(1, 7, dtype=torch.long)
    kw = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), negative_prompt_embeds=_embeds(1, 7, 32, seed=2),
              prompt_attention_mask=mask, negative_prompt_attention_mask=mask, height=8 * H, width=8 * W,
              use_resolution_binning=False, negative_prompt=None)
    return pipe, kw


def sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    _seeded()
    net = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                                 attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                 cross_attention_dim=8, caption_channels=8, sample_size=32)
    pipe = SanaPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=None,
                        text_encoder=None, tokenizer=None)
    mask = torch.ones(1, 7, dtype=torch.long)
    kw = dict(prompt_embeds=_embeds(1, 7, 8, seed=1), negative_prompt_embeds=_embeds(1, 7, 8, seed=2),
              prompt_attention_mask=mask, negative_prompt_attention_mask=mask, height=32 * H, width=32 * W,
              use_resolution_binning=False, complex_human_instruction=None, negative_prompt=None)
    return pipe, kw


def dit():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    _seeded()
    net = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                                in_channels=4, out_channels=8, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=[8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8, layers_per_block=1)
    pipe = DiTPipeline(transformer=net, vae=vae, scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[3], output_type="np")


def _unet(**extra):
    from diffusers import UNet2DConditionModel
    _seeded()
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4, **extra)


def sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline(unet=_unet(), scheduler=DDIMScheduler(), vae=None, text_encoder=None,
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    kw = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), negative_prompt_embeds=_embeds(1, 7, 32, seed=2),
              height=8 * H, width=8 * W)
    return pipe, kw


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 transformer_layers_per_block=1)
    pipe = StableDiffusionXLPipeline(unet=unet, scheduler=EulerDiscreteScheduler(), vae=None, text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    kw = dict(prompt_embeds=_embeds(1, 7, 32, seed=1), negative_prompt_embeds=_embeds(1, 7, 32, seed=2),
              pooled_prompt_embeds=_embeds(1, 32, seed=3), negative_pooled_prompt_embeds=_embeds(1, 32, seed=4),
              height=8 * H, width=8 * W)
    return pipe, kw


def _eval(builder):
    """Models leave their constructors in training mode (DiT's label embedding then drops labels at random)."""
    def build(*args, **kwargs):
        pipe, kw = builder(*args, **kwargs)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe, kw
    build.__name__ = builder.__name__
    return build


sd, sdxl, sd3, flux, pixart, sana, dit = map(_eval, (sd, sdxl, sd3, flux, pixart, sana, dit))
BUILDERS = {"sd": sd, "sdxl": sdxl, "sd3": sd3, "flux": flux, "pixart": pixart, "sana": sana, "dit": dit}


def run(pipe, kw, steps: int = 2, seed: int = 0, **more):
    """The pipeline's latents (np images for DiT, whose pipeline always decodes) of one seeded call."""
    args = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), **kw, **more}
    args.setdefault("output_type", "latent")
    out = pipe(**args)
    return torch.as_tensor(out.images)
