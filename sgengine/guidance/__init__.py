"""Guidance that composes around a denoiser: CFG, self-attention guidance (SAG) and the pieces SAG
needs (per-objective parameterisations, attention-mass capture)."""
from .attach import KeyMassCapture, capture_key_mass, list_attention_layers
from .cfg import CFG
from .param import Parameterization, parameterization_for
from .sag import SAG

__all__ = ["CFG", "SAG", "KeyMassCapture", "capture_key_mass", "list_attention_layers",
           "Parameterization", "parameterization_for"]
