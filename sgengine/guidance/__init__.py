"""Guidance that composes around a denoiser: CFG, self-attention guidance (SAG) and the pieces SAG
needs (per-objective parameterisations, attention-mass capture), for engine networks and diffusers UNets."""
from .attach import KeyMassCapture, capture_key_mass, list_attention_layers
from .cfg import CFG
from .diffusers_unet import DiffusersDenoiser, attach_diffusers, list_diffusers_layers
from .param import Parameterization, eps_param, parameterization_for
from .sag import SAG

__all__ = ["CFG", "SAG", "DiffusersDenoiser", "KeyMassCapture", "Parameterization", "attach_diffusers",
           "capture_key_mass", "eps_param", "list_attention_layers", "list_diffusers_layers", "parameterization_for"]
