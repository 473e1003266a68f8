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
    with sg.sag(pipe, scale=0.75): image = pipe(prompt).images[0]  # a diffusers pipeline (SD..SD3, Flux, ...);
                                                   # sg.pag / sg.seg alike
    sg.save_grid(x, rows=2, path="grid.png")       # floats in [-1, 1] / [0, 1] or uint8, checked
    sg.cluster_report(labels, k, true_labels)      # NMI / ARI / accuracy / balance
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# `import sgengine.kernels` or `import sgengine.diffusion` does not load the trainer, annotate,
# DeepSpeed or triton, and `import sgengine` costs almost nothing.
_EXPORTS = {
    **dict.fromkeys(("Annotations", "load_annotations", "save_annotations"), "annotate.io"),
    **dict.fromkeys(("KMeans", "kmeans"), "annotate.kmeans"),
    **dict.fromkeys(("PRESETS", "TrainConfig", "apply_overrides", "preset"), "config"),
    **dict.fromkeys(("SAMPLERS", "EDMLoss", "EDMPrecond", "EpsilonLoss", "FlowMatchingLoss", "Parameterization",
                     "edm_param", "eps_param", "flow_param", "karras_sigmas", "make_objective",
                     "parameterization_for", "v_param"), "diffusion"),
    **dict.fromkeys(("cluster_report", "format_report"), "eval.cluster"),
    **dict.fromkeys(("SAG", "DiffusersDenoiser", "capture_key_mass", "list_attention_layers"), "guidance"),
    "CFG": "guidance.cfg",
    **dict.fromkeys(("pag", "sag", "seg"), "guidance.pipeline_guidance"),
    **dict.fromkeys(("PAGGuider", "SAGGuider", "SEGGuider"), "guidance.guiders"),  # diffusers >= 0.36, on first use
    "scheduler_param": "guidance.schedulers",
    **dict.fromkeys(("UNET_PRESETS", "UNet", "UNetConfig", "unet_config"), "models.unet"),
    **dict.fromkeys(("Generator", "load_generator", "sample"), "sampling"),
    "EMA": "training.ema",
    "Trainer": "training.trainer",
    "save_grid": "viz",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sgengine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
