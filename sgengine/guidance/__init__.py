"""Guidance that composes around a denoiser: CFG, self-attention guidance (SAG) and the pieces SAG
needs (per-objective parameterisations, attention-mass capture through the attention adapters of
``sgengine.guidance.adapters``), for engine networks, diffusers UNets and diffusion transformers."""
from .adapters import adapter_for
from .attach import capture_key_mass, list_attention_layers
from .cfg import CFG
from .diffusers_denoiser import DiffusersDenoiser
from .param import Parameterization, eps_param, parameterization_for
from .sag import SAG

__all__ = ["CFG", "SAG", "DiffusersDenoiser", "Parameterization", "adapter_for", "capture_key_mass", "eps_param",
           "list_attention_layers", "parameterization_for"]
