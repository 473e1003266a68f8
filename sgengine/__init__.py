"""sgengine: self-guided diffusion, fast on one GPU and scaled out with DeepSpeed.

The small importable API::

    import sgengine as sg
    cfg = sg.preset("digits")                      # frozen TrainConfig (papers' tables as presets)
    run = sg.Trainer(cfg).run()                    # checkpoint, sample grid, metrics
    # (cfg.condition 'self-labels' reads --out/annotations.safetensors: sgengine.train.train(cfg) makes it first)
    gen = sg.load_generator(cfg.out)               # EMA weights + cluster frequencies
    x = sg.sample(gen, clusters=None, n=16, w=2.0) # clusters drawn from the training frequencies
"""
from .annotate.io import Annotations, load_annotations, save_annotations
from .annotate.kmeans import KMeans, kmeans
from .config import PRESETS, TrainConfig, apply_overrides, preset
from .guidance import (SAG, DiffusersDenoiser, Parameterization, capture_key_mass, list_attention_layers,
                       parameterization_for)
from .guidance.cfg import CFG
from .models.unet import UNET_PRESETS, UNet, UNetConfig, unet_config
from .sampling import Generator, load_generator, sample
from .training.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Annotations", "load_annotations", "save_annotations", "KMeans", "kmeans",
    "PRESETS", "TrainConfig", "apply_overrides", "preset", "CFG", "SAG", "DiffusersDenoiser", "Parameterization",
    "capture_key_mass", "list_attention_layers", "parameterization_for",
    "UNET_PRESETS", "UNet", "UNetConfig", "unet_config",
    "Generator", "load_generator", "sample", "Trainer",
]
