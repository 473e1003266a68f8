"""Self-attention guidance (and PAG / SEG) on a diffusers StableDiffusion3Pipeline, as a drop-in.

With a real model the three lines are::

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    with sg.sag(pipe, scale=0.75):
        image = pipe("a photo of a cat", guidance_scale=7.0).images[0]

This script runs the same on a tiny random SD3 transformer built from a config (no download, no
text encoders: the prompt is given as embeddings, the result as latents) at a non-square latent,
and checks that scale 0 gives the plain pipeline's latents bit for bit.

    python examples/sag_sd3_pipeline.py
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

import sgengine as sg


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    pipe = tiny_sd3_pipeline()
    g = torch.Generator().manual_seed(1)
    prompt = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g),
                  negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g))

    def generate():  # a 64 x 96 px image: an 8 x 12 latent, 4 x 6 tokens of 2 x 2
        return pipe(**prompt, height=64, width=96, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    plain = generate()
    with sg.sag(pipe, scale=0.0):
        assert torch.equal(generate(), plain), "scale 0 must be the plain pipeline"
    for name, guide, scale in (("sag", sg.sag, 0.75), ("pag", sg.pag, 3.0), ("seg", sg.seg, 3.0)):
        with guide(pipe, scale=scale) as g:
            out = generate()
        print(f"{name} at layer {g.layer}: mean |latent change| {float((out - plain).abs().mean()):.4f}")
    assert torch.equal(generate(), plain), "leaving the with block restores the pipeline"
    print("ok: scale 0 and the restored pipeline equal the plain pipeline bit for bit")


if __name__ == "__main__":
    main()
