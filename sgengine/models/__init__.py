"""Networks: the paper's ADM-style UNet and the U-ViT, sharing one attention function."""
from .attention import MultiHeadAttention, attention, set_attention_impl
from .unet import UNET_PRESETS, UNet, UNetConfig, unet_config
from .uvit import UVIT_PRESETS, UViT, UViTConfig, uvit_config

__all__ = ["MultiHeadAttention", "attention", "set_attention_impl", "UNET_PRESETS", "UNet", "UNetConfig",
           "unet_config", "UVIT_PRESETS", "UViT", "UViTConfig", "uvit_config"]
