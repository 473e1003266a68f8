"""Moved to ``sgengine.diffusion.objectives`` (kept as a re-export until the trainer imports it from there)."""
from ..diffusion.objectives import OBJECTIVES, Objective, TimeScale, build_network, make_objective, run_sampler

__all__ = ["OBJECTIVES", "Objective", "TimeScale", "build_network", "make_objective", "run_sampler"]
