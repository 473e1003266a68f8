"""SAG, PAG and SEG as diffusers guiders (``diffusers.guiders.BaseGuidance``; diffusers >= 0.36).

A modular pipeline takes them as its ``guider`` component::

    from sgengine.guidance.guiders import SAGGuider
    pipe.update_components(guider=SAGGuider(guidance_scale=7.0, sag_scale=0.75))

They work on any denoiser an attention adapter claims (``sgengine.guidance.adapters``: SD3 /
SD3.5 joint attention, PixArt, DiT, Sana, diffusers UNets), so the layer is read and perturbed as
the model runs it: the image-image block of SD3's [img; txt] attention with its q/k norms (unlike
diffusers' ``PAGJointAttnProcessor2_0``), SEG's blur on the image tokens' own (h, w) grid, non-square
included (unlike diffusers' ``SmoothedEnergyGuidance``, which blurs the first floor(sqrt(N))^2 tokens
and, its ``_count_prepared`` never incremented, never applies its hooks). ``layer`` None takes the
family's documented default (``adapter_for(net).default_layer``).

The CFG part is a diffusers guider of the two predictions (pred_cond, pred_uncond): ``cfg=None``
is ``ClassifierFreeGuidance(guidance_scale)``; pass ``cfg=AdaptiveProjectedGuidance(...)`` for APG
(or any guider of those two predictions). One denoising step runs these passes of B samples, in
the modular loop's order, and the first two are SHARED between CFG / APG and the attention guidance:

    guider  CFG / APG on                                 CFG / APG off (scale 1, outside its window)
    SAG     cond, uncond (+ key mass), uncond at x_deg   cond (+ key mass), cond at x_deg
    PAG     cond, uncond, cond perturbed                 cond, cond perturbed
    SEG     cond, uncond, cond blurred                   cond, cond blurred

SAG's mask costs no forward: the key mass is read during the uncond pass CFG needs anyway, and
x0 / eps come from that pass's prediction. So SAG + CFG (or APG) is 3 passes against CFG's 2, as
PAG + CFG is. With the CFG / APG prediction ``base`` (pred_cond when CFG is off):

    SAG:        pred = base + s (pred_u - pred_deg - g (x_t - x_deg))     (``sgengine.guidance.sag``)
    PAG / SEG:  pred = base + s (pred_cond - pred_perturbed)               (diffusers' PAG / SEG line)

x_deg blurs x0 where the key mass is above ``threshold`` times its mean and re-noises with the
model's own eps at the scheduler's timestep (``scheduler_param(scheduler)``: flow matching as
diffusers runs it by default, SD3's; pass ``scheduler=pipe.scheduler`` for an eps / v model). The
latent passed to the denoiser (its first argument: ``hidden_states`` or ``sample``, (B, C, H, W))
is read and, for SAG's pass, replaced by x_deg through a forward pre-hook, so the guider needs
nothing of the pipeline's own inputs. ``sag_scale`` (``perturbed_guidance_scale``,
``seg_guidance_scale``) 0 or a step outside [start, stop) (fractions of the steps, start_step <=
step < stop_step as diffusers' CFG) drops the extra pass: the step is exactly the CFG guider's.
Every hook lives for one pass (installed in ``prepare_models``, removed in ``cleanup_models``).
"""
from __future__ import annotations

import inspect
import math

import torch

from .adapters import adapter_for
from .sag import check_sag_args, sag_degraded, sag_delta
from .schedulers import scheduler_param

MIN_DIFFUSERS = "0.36"  # dict inputs to prepare_inputs (0.35's guiders took a BlockState)


def _guider_api():
    """diffusers' guider API, or an ImportError of one line naming the version needed."""
    fix = f"pip install -U 'diffusers>={MIN_DIFFUSERS}'"
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"sgengine.guidance.guiders needs diffusers >= {MIN_DIFFUSERS}: {fix}") from None
    if tuple(int(p) for p in diffusers.__version__.split(".")[:2]) < tuple(map(int, MIN_DIFFUSERS.split("."))):
        raise ImportError(f"sgengine.guidance.guiders needs diffusers >= {MIN_DIFFUSERS} (guiders taking a dict of "
                          f"inputs); installed {diffusers.__version__}: {fix}")
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance
    from diffusers.guiders.guider_utils import GuiderOutput
    return register_to_config, BaseGuidance, ClassifierFreeGuidance, GuiderOutput


register_to_config, BaseGuidance, ClassifierFreeGuidance, GuiderOutput = _guider_api()


class _AttentionGuidance(BaseGuidance):
    """CFG / APG (``self.cfg``) plus one extra pass of attention guidance; see the module docstring.
    Subclasses set ``extra`` (the extra pass's prediction name), ``under`` (0: the extra pass runs
    under the condition, 1: under the unconditional prompt) and the hooks of each pass."""

    extra = ""
    under = 0
    ignore_for_config = ["cfg"]  # objects, not JSON: ``new()`` carries them over

    def __init__(self, guidance_scale, scale, layer, start, stop, enabled, cfg, extra_window=(0.0, 1.0)):
        super().__init__(start, stop, enabled)
        if cfg is not None and guidance_scale is not None:
            raise ValueError("pass either guidance_scale (plain CFG) or cfg=<a guider of pred_cond, pred_uncond>, "
                             "not both")
        if cfg is not None and list(getattr(cfg, "_input_predictions", [])) != ["pred_cond", "pred_uncond"]:
            raise TypeError(f"cfg must combine (pred_cond, pred_uncond), as ClassifierFreeGuidance or "
                            f"AdaptiveProjectedGuidance do; {type(cfg).__name__} takes {cfg._input_predictions}")
        if not 0.0 <= extra_window[0] <= extra_window[1] <= 1.0:
            raise ValueError(f"the guidance window must be 0 <= start <= stop <= 1 (fractions of the steps), "
                             f"got {extra_window}")
        # by keyword: diffusers' from_config (``new()``) resets positional arguments to their defaults
        w = 7.0 if guidance_scale is None else guidance_scale
        self.cfg = cfg if cfg is not None else ClassifierFreeGuidance(guidance_scale=w)
        self.scale, self.layer, self.window = float(scale), layer, tuple(extra_window)
        self.passes, self.batches, self.hooks, self.seen = [], [], [], {}

    def new(self, **kwargs):
        """A copy with the same configuration and a copy of the CFG / APG guider, ``kwargs`` overriding
        (``guidance_scale=`` replaces the CFG part by plain CFG at that scale)."""
        params = {k: v for k, v in self.config.items() if not k.startswith("_")}
        params.update({name: getattr(self, name) for name in self.ignore_for_config if name != "cfg"})
        params.update(cfg=None if "guidance_scale" in kwargs else self.cfg.new(), guidance_scale=None)
        return self.__class__(**{**params, **kwargs})

    # -- state --------------------------------------------------------------------------------

    def set_state(self, step, num_inference_steps, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self.cfg.set_state(step, num_inference_steps, timestep)
        self.close_hooks()
        self.passes, self.batches, self.seen = [], [], {}

    def cfg_on(self) -> bool:
        return self._enabled and self.cfg.num_conditions > 1

    def extra_on(self) -> bool:
        if not self._enabled or math.isclose(self.scale, 0.0):
            return False
        if self._num_inference_steps is None:
            return True
        lo, hi = (int(f * self._num_inference_steps) for f in self.window)
        return lo <= self._step < hi

    @property
    def num_conditions(self) -> int:
        return 1 + self.cfg_on() + self.extra_on()

    @property
    def is_conditional(self) -> bool:
        index = self._count_prepared - 1
        return not (0 <= index < len(self.passes)) or self.passes[index][1] == 0

    def plan(self) -> list[tuple[str, int]]:
        """(prediction name, tuple index) of each pass this step: the condition first, as diffusers."""
        out = [("pred_cond", 0)] + ([("pred_uncond", 1)] if self.cfg_on() else [])
        return out + ([(self.extra, self.under if self.cfg_on() else 0)] if self.extra_on() else [])

    # -- the modular loop's protocol ------------------------------------------------------------

    def prepare_inputs(self, data: dict) -> list:
        self.cfg.prepare_inputs(data)  # its own per-step state (APG's momentum buffer)
        self.passes = self.plan()
        self.batches = [self._prepare_batch(data, index, name) for name, index in self.passes]
        return self.batches

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        self.cfg.prepare_inputs_from_block_state(data, input_fields)
        self.passes = self.plan()
        self.batches = [self._prepare_batch_from_block_state(input_fields, data, index, name)
                        for name, index in self.passes]
        return self.batches

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self.close_hooks()  # a pass that raised never reached its cleanup
        self._count_prepared += 1
        if self._count_prepared > len(self.passes):
            raise RuntimeError(f"{type(self).__name__}: prepare_models called {self._count_prepared} times for "
                               f"{len(self.passes)} passes: call set_state and prepare_inputs each step")
        if self._count_prepared == 1 and self.extra_on():  # a wrong layer fails before any forward
            self.layers(denoiser)
        self.open_pass(denoiser, *self.passes[self._count_prepared - 1])

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self.close_pass(denoiser, self.passes[self._count_prepared - 1][0])
        self.close_hooks()

    def close_hooks(self) -> None:
        while self.hooks:
            self.hooks.pop().close()

    def forward(self, pred_cond, pred_uncond=None, **extra) -> "GuiderOutput":
        base = self.cfg.forward(pred_cond, pred_uncond).pred if self.cfg_on() else pred_cond
        if self.extra_on():
            term = self.term(pred_cond, pred_uncond, extra[self.extra])
            base = (base.float() + self.scale * term).to(base.dtype)
        return GuiderOutput(pred=base, pred_cond=pred_cond, pred_uncond=pred_uncond)

    # -- per family -------------------------------------------------------------------------------

    def layers(self, denoiser) -> tuple:
        """(the denoiser's adapter, the checked layer names): ``layer`` as one name or a list; None
        is the family's default. Unknown names fail in one line listing the layers."""
        adapter = adapter_for(denoiser)
        names = [self.layer] if isinstance(self.layer, str) else list(self.layer or [adapter.default_layer])
        return adapter, [adapter.check_layer(name) for name in names]

    def open_pass(self, denoiser, name: str, index: int) -> None:
        raise NotImplementedError

    def close_pass(self, denoiser, name: str) -> None:
        pass

    def term(self, pred_cond, pred_uncond, pred_extra) -> torch.Tensor:
        raise NotImplementedError


class _Latent:
    """A forward pre-hook on the denoiser's latent argument (its first parameter): records it and,
    given ``replace``, passes that instead. ``close()`` removes it (a ``Hook``-like handle)."""

    def __init__(self, denoiser, replace: torch.Tensor | None = None):
        self.name = next(iter(inspect.signature(denoiser.forward).parameters))
        self.replace, self.value = replace, None
        self.handle = denoiser.register_forward_pre_hook(self.see, with_kwargs=True)

    def see(self, module, args, kwargs):
        by_name = self.name in kwargs
        x = kwargs[self.name] if by_name else args[0]
        if not (torch.is_tensor(x) and x.dim() == 4):
            raise ValueError(f"SAG's guider degrades a (B, C, H, W) latent; {type(module).__name__}'s "
                             f"{self.name} is {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__} "
                             "(a packed latent: use sg.sag(pipe) instead)")
        self.value = x
        if self.replace is None:
            return None
        if by_name:
            return args, {**kwargs, self.name: self.replace.to(x.dtype)}
        return (self.replace.to(x.dtype), *args[1:]), kwargs

    def close(self) -> None:
        self.handle.remove()


class SAGGuider(_AttentionGuidance):
    """SAG (Hong et al., Eq. 16-17) + CFG / APG as a diffusers guider; see the module docstring.

    sag_scale: s; layer: the attention layer whose key mass masks the blur (None: the family's
    default); threshold, blur: the mask threshold (times the mean mass) and the (kernel, sigma) of
    the Gaussian; sag_start / sag_stop: the window in fractions of the steps; scheduler: the
    pipeline's scheduler (its parameterisation; None: flow matching with 1000 train timesteps);
    backend: the key-mass and degrade kernels' backend.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_sag"]
    extra, under = "pred_sag", 1
    ignore_for_config = ["cfg", "scheduler"]

    @register_to_config
    def __init__(self, guidance_scale: float | None = None, sag_scale: float = 0.75, layer: str | None = None,
                 threshold: float = 1.0, blur: tuple = (9, 1.0), sag_start: float = 0.0, sag_stop: float = 1.0,
                 backend: str = "auto", start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 cfg=None, scheduler=None):
        super().__init__(guidance_scale, sag_scale, layer, start, stop, enabled, cfg, (sag_start, sag_stop))
        check_sag_args(blur, None, threshold)
        self.threshold, self.blur, self.backend = float(threshold), (int(blur[0]), float(blur[1])), backend
        if scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler
            scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler = scheduler
        # Only the conversions at the scheduler's own timesteps are used, never its grid: any
        # sequence length serves a dynamically shifted scheduler.
        self.param = scheduler_param(scheduler, image_seq_len=0)

    def mask_pass(self) -> str:
        return "pred_uncond" if self.cfg_on() else "pred_cond"

    def open_pass(self, denoiser, name: str, index: int) -> None:
        if name == self.mask_pass() and self.extra_on():
            adapter, layers = self.layers(denoiser)
            if len(layers) != 1:
                raise ValueError(f"SAG reads the key mass of one layer, got {layers}")
            self.hooks += [adapter.capture(layers[0], self.backend), _Latent(denoiser)]
        elif name == self.extra:
            self.seen["x_deg"] = self.degraded()
            self.hooks.append(_Latent(denoiser, replace=self.seen["x_deg"]))

    def close_pass(self, denoiser, name: str) -> None:
        if name == self.mask_pass() and self.extra_on():
            capture, latent = self.hooks
            self.seen.update(mass=capture.mass, x=latent.value)

    def timesteps(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._timestep, device=x.device).float().reshape(-1).expand(x.shape[0])

    def degraded(self) -> torch.Tensor:
        """x_deg from the mask pass: its latent, prediction and key mass (``sag_degraded``)."""
        names = [name for name, _ in self.passes]
        pred = self.batches[names.index(self.mask_pass())].noise_pred
        x = self.seen["x"]
        return sag_degraded(self.param, x, eps_half(pred, x), self.seen["mass"], self.timesteps(x),
                            self.threshold, self.blur, self.backend)

    def term(self, pred_cond, pred_uncond, pred_extra) -> torch.Tensor:
        x, x_deg = self.seen["x"], self.seen["x_deg"]
        pred = pred_uncond if self.cfg_on() else pred_cond
        delta = sag_delta(self.param, x, x_deg, eps_half(pred, x), eps_half(pred_extra, x), self.timesteps(x))
        return learned_sigma_pad(delta, pred)


def eps_half(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A learned-sigma output (2C channels: PixArt, DiT) guides its prediction half."""
    return pred[:, : x.shape[1]] if pred.shape[1] == 2 * x.shape[1] else pred


def learned_sigma_pad(delta: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The guidance term over a learned-sigma output: zero on the variance half (left as predicted)."""
    if delta.shape[1] == pred.shape[1]:
        return delta
    return torch.cat([delta, delta.new_zeros(delta.shape[0], pred.shape[1] - delta.shape[1], *delta.shape[2:])], 1)


class _PerturbedGuidance(_AttentionGuidance):
    """PAG / SEG: the extra pass runs the condition with ``mode`` on every layer in ``layers``."""

    mode = ""

    def open_pass(self, denoiser, name: str, index: int) -> None:
        if name != self.extra:
            return
        adapter, layers = self.layers(denoiser)
        self.hooks += [adapter.perturb(layer, self.mode, **self.options()) for layer in layers]

    def options(self) -> dict:
        return {}

    def term(self, pred_cond, pred_uncond, pred_extra) -> torch.Tensor:
        return pred_cond.float() - pred_extra.float()


class PAGGuider(_PerturbedGuidance):
    """PAG (Ahn et al. 2024) + CFG / APG: identity attention on the image-image block of ``layer``
    (a name or a list; None: the family's default), q/k norms kept; see the module docstring."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_pag"]
    extra, mode = "pred_cond_pag", "pag"

    @register_to_config
    def __init__(self, guidance_scale: float | None = None, perturbed_guidance_scale: float = 3.0,
                 layer: str | list | None = None, perturbed_guidance_start: float = 0.0,
                 perturbed_guidance_stop: float = 1.0, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 cfg=None):
        super().__init__(guidance_scale, perturbed_guidance_scale, layer, start, stop, enabled, cfg,
                         (perturbed_guidance_start, perturbed_guidance_stop))


class SEGGuider(_PerturbedGuidance):
    """SEG (Hong 2024) + CFG / APG: the image queries of ``layer`` blurred by ``seg_blur_sigma`` on
    their own (h, w) grid (> 9999.9: the mean query, diffusers' default), text tokens untouched."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_seg"]
    extra, mode = "pred_cond_seg", "seg"

    @register_to_config
    def __init__(self, guidance_scale: float | None = None, seg_guidance_scale: float = 3.0,
                 seg_blur_sigma: float = 9999999.0, layer: str | list | None = None, seg_guidance_start: float = 0.0,
                 seg_guidance_stop: float = 1.0, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 cfg=None):
        super().__init__(guidance_scale, seg_guidance_scale, layer, start, stop, enabled, cfg,
                         (seg_guidance_start, seg_guidance_stop))
        if not seg_blur_sigma > 0:
            raise ValueError(f"seg_blur_sigma must be > 0 (> 9999.9: the mean query), got {seg_blur_sigma}")
        self.sigma = float(seg_blur_sigma)

    def options(self) -> dict:
        return {"sigma": self.sigma}


def sd3_guided_step(guider, transformer, x, t, cond, uncond):
    """One denoiser step of diffusers' guider protocol on an SD3 transformer, exactly as the modular
    ``StableDiffusion3LoopDenoiser`` runs it: for a loop of your own, and the tests and benchmarks.
    x: (B, C, H, W) latent; t: scalar timestep; cond / uncond: (prompt_embeds, pooled_prompt_embeds)."""
    guider.set_state(step=0, num_inference_steps=1, timestep=t)
    batches = guider.prepare_inputs({"hidden_states": (x, x), "encoder_hidden_states": (cond[0], uncond[0]),
                                     "text_embeds": (cond[1], uncond[1])})
    for batch in batches:
        guider.prepare_models(transformer)
        batch.noise_pred = transformer(hidden_states=batch.hidden_states, timestep=t.expand(x.shape[0]),
                                       encoder_hidden_states=batch.encoder_hidden_states,
                                       pooled_projections=batch.text_embeds, return_dict=False)[0]
        guider.cleanup_models(transformer)
    return guider(batches).pred


__all__ = ["MIN_DIFFUSERS", "PAGGuider", "SAGGuider", "SEGGuider", "sd3_guided_step"]
