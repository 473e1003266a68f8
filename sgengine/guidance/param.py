"""The per-objective parameterisations SAG re-noises with live in ``sgengine.diffusion.param``
(one place: the samplers' adapters use the same conversions); re-exported here for guidance users."""
from ..diffusion.param import (Denoiser, Parameterization, edm_param, eps_param, flow_param,
                               parameterization_for, v_param)

__all__ = ["Denoiser", "Parameterization", "edm_param", "eps_param", "flow_param",
           "parameterization_for", "v_param"]
