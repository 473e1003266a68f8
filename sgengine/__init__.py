"""sgengine: self-guided diffusion, fast on one GPU and scaled out with DeepSpeed.

The small importable API::

    import sgengine as sg
    cfg = sg.preset("digits")                      # frozen TrainConfig (papers' tables as presets)
    run = sg.Trainer(cfg).run()                    # checkpoint, sample grid, metrics
    # (cfg.condition 'self-labels' reads --out/annotations.safetensors: sgengine.train.train(cfg) makes it first)
    gen = sg.load_generator(cfg.out)               # EMA weights + cluster frequencies
    x = sg.sample(gen, clusters=None, n=16, w=2.0) # clusters drawn from the training frequencies

Embedding in another training loop (examples/third_party_trainer.py runs all of it on a diffusers UNet)::

    labels = sg.kmeans(features, k)[1]             # self-labels: k-means on any features (centroids, ids)
    loss = sg.EpsilonLoss()(net, x, y=labels)      # or EDMLoss / FlowMatchingLoss; net(x_t, t, y=, null=)
    ema = sg.EMA(net); ema.update(net)             # after each optimiser step
    gen = sg.Generator.of(ema.module, sg.eps_param(abar), (3, 32, 32), num_classes=k)  # eps, v, D, flow nets
    x = sg.sample(gen, labels[:8], w=2.0, sampler="heun", sag_scale=0.75)  # any of sg.SAMPLERS, CFG + SAG
    sg.save_grid(x, rows=2, path="grid.png")       # floats in [-1, 1] / [0, 1] or uint8, checked
    sg.cluster_report(labels, k, true_labels)      # NMI / ARI / accuracy / balance
"""
from .annotate.io import Annotations, load_annotations, save_annotations
from .annotate.kmeans import KMeans, kmeans
from .config import PRESETS, TrainConfig, apply_overrides, preset
from .diffusion import (SAMPLERS, EDMLoss, EDMPrecond, EpsilonLoss, FlowMatchingLoss, Parameterization,
                        edm_param, eps_param, flow_param, karras_sigmas, make_objective, parameterization_for,
                        v_param)
from .eval.cluster import cluster_report, format_report
from .guidance import SAG, DiffusersDenoiser, capture_key_mass, list_attention_layers
from .guidance.cfg import CFG
from .models.unet import UNET_PRESETS, UNet, UNetConfig, unet_config
from .sampling import Generator, load_generator, sample
from .training.ema import EMA
from .training.trainer import Trainer
from .viz import save_grid

__version__ = "0.1.0"

__all__ = [
    "Annotations", "load_annotations", "save_annotations", "KMeans", "kmeans",
    "PRESETS", "TrainConfig", "apply_overrides", "preset", "CFG", "SAG", "DiffusersDenoiser", "Parameterization",
    "capture_key_mass", "list_attention_layers", "parameterization_for",
    "SAMPLERS", "EDMLoss", "EDMPrecond", "EpsilonLoss", "FlowMatchingLoss", "edm_param", "eps_param", "flow_param",
    "karras_sigmas", "make_objective", "v_param", "cluster_report", "format_report", "EMA", "save_grid",
    "UNET_PRESETS", "UNet", "UNetConfig", "unet_config",
    "Generator", "load_generator", "sample", "Trainer",
]
