"""SAG, PAG and SEG as drop-ins for standard diffusers pipelines::

    with sg.sag(pipe, scale=0.75):          # or sg.pag(pipe, scale=3.0) / sg.seg(pipe, scale=3.0)
        image = pipe(prompt, guidance_scale=7.0).images[0]

Each wraps the pipeline's denoiser (``pipe.unet`` / ``pipe.transformer``, see
``sgengine.guidance.pipelines``) with a forward pre-hook and a forward hook; leaving the ``with``
block (an exception included) removes them and restores every attention layer. On each forward
it reads the pipeline's own batch: [uncond; cond] under the pipeline's CFG, or one batch
without it (guidance-distilled Flux-dev, guidance_scale = 1). With d the guidance term of one
extra forward of the guiding half it returns

    uncond' = uncond + s d,   cond' = cond + s d,

so the pipeline's own CFG line gives uncond + w (cond - uncond) + s d: CFG plus SAG / PAG / SEG
exactly, and without CFG, pred + s d. The term d:

* SAG (Hong et al., Eq. 16-17; ``sgengine.guidance.sag``): the key mass of the unconditional
  samples is read during the pipeline's own forward; x_deg blurs x0 where the mass is above
  average and re-noises with the model's eps in the scheduler's parameterisation
  (``scheduler_param``: eps, v or flow matching); d = pred_u - pred_deg - g (x_t - x_deg), the
  extra forward under the unconditional prompt (one batch of B against the pipeline's 2B).
* PAG (Ahn et al. 2024): d = cond - cond_perturbed, the extra forward of the conditional half
  with identity attention on the layer's image-image block (diffusers' PAG pipelines' formula).
* SEG (Hong 2024): as PAG, with the image queries blurred on their 2-D grid (``sigma``).

Learned-sigma outputs (PixArt, DiT: 2C channels) are guided on their eps half; the variance half
is returned as the pipeline expects it. ``scale = 0`` or a step outside ``window`` (t_lo, t_hi),
in the scheduler's timesteps (``pipe.scheduler.timesteps``), runs the plain forward only.
``layer`` None takes the family's documented default (``adapter_for(net).default_layer``).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from .adapters import adapter_for
from .pipelines import kind_of
from .sag import check_sag_args, sag_degraded, sag_delta
from .schedulers import scheduler_param


@dataclass
class _Step:
    call: dict  # the forward's arguments by name
    x: torch.Tensor  # its latent batch
    t: torch.Tensor  # (B,) scheduler timesteps
    rows: slice  # the samples the guidance term is computed from (uncond for SAG, cond for PAG / SEG)
    gate: torch.Tensor  # (rows,) 1 inside the window, 0 outside


def _rows(v, rows: slice, n: int, unbatched: bool):
    if unbatched:
        return v
    if isinstance(v, dict):
        return {k: _rows(u, rows, n, False) for k, u in v.items()}
    return v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    return (sample, *output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=sample)


class PipelineGuidance:
    """The hooks on one pipeline's denoiser; ``SAGOnPipeline`` / ``PerturbedOnPipeline`` say what the
    extra forward is. Use as a context manager (or call ``close()``)."""

    def __init__(self, pipe, scale: float, layer: str | None, window, backend: str = "auto"):
        self.kind = kind_of(pipe)
        self.pipe, self.net = pipe, getattr(pipe, self.kind.denoiser)
        self.adapter = adapter_for(self.net)
        self.layer = self.adapter.default_layer if layer is None else self.adapter.check_layer(layer)
        if window is not None and not (len(window) == 2 and window[0] <= window[1]):
            raise ValueError(f"window must be (t_lo, t_hi) in the scheduler's timesteps, t_lo <= t_hi, or None; got {window}")
        self.scale, self.window, self.backend = float(scale), window, backend
        self.signature = inspect.signature(self.net.forward)
        self.step, self.busy, self.handles, self.hook = None, False, [], None

    def _install(self, hook) -> None:
        self.hook, hook.active = hook, False
        self.handles = [self.net.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.net.register_forward_hook(self._after, with_kwargs=True)]

    def _bind(self, args, kwargs) -> dict:
        bound = self.signature.bind(*args, **kwargs).arguments
        extra = [p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        return {**{k: v for k, v in bound.items() if k not in extra}, **{k: v for e in extra for k, v in bound.get(e, {}).items()}}

    def _plan(self, args, kwargs) -> _Step | None:
        if self.scale == 0.0:
            return None
        call = self._bind(args, kwargs)
        x = call[self.kind.sample]
        n = x.shape[0]
        t = torch.as_tensor(call["timestep"], device=x.device).float().reshape(-1).expand(n)
        t = t * self.kind.timestep_scale(self.pipe)
        gate = torch.ones(n, device=x.device) if self.window is None else (
            (t >= self.window[0]) & (t <= self.window[1])).float()
        if self.window is not None and not bool(gate.any()):
            return None
        rows = self.rows(n, self.kind.cfg(self.pipe, x))
        return _Step(call, x, t, rows, gate[rows])

    def rows(self, n: int, cfg: bool) -> slice:
        raise NotImplementedError

    def _before(self, module, args, kwargs):
        if not self.busy:
            self.step = self._plan(args, kwargs)
            self.before(self.step)

    def before(self, step: _Step | None) -> None:
        """Set the hook up for the pipeline's own forward (SAG: capture the guiding rows)."""

    def _after(self, module, args, kwargs, output):
        if self.busy or self.step is None:
            return None
        step, self.step = self.step, None
        self.hook.active = False
        out = _sample(output)
        c = step.x.shape[1]
        learned = out.dim() == 4 and out.shape[1] == 2 * c  # learned sigma: [eps; variance]
        pred = out[:, :c] if learned else out
        d = self.term(step, pred[step.rows])
        s = (self.scale * step.gate).view(-1, *([1] * (d.dim() - 1)))
        pred = (pred.float() + (s * d).repeat(pred.shape[0] // d.shape[0], *([1] * (d.dim() - 1)))).to(out.dtype)
        return _with_sample(output, torch.cat([pred, out[:, c:]], dim=1) if learned else pred)

    def term(self, step: _Step, pred: torch.Tensor) -> torch.Tensor:
        """The guidance term d (rows, ...) in float32 from the guiding rows' prediction ``pred``."""
        raise NotImplementedError

    def extra_forward(self, step: _Step, x: torch.Tensor, perturbed: bool) -> torch.Tensor:
        """The denoiser on the guiding rows' arguments with latent ``x``; the prediction (eps half)."""
        n, unbatched = step.x.shape[0], self.kind.unbatched
        call = {k: _rows(v, step.rows, n, k in unbatched) for k, v in step.call.items()}
        call[self.kind.sample] = x
        self.busy, self.hook.active = True, perturbed
        try:
            out = _sample(self.net(**call))
        finally:
            self.busy, self.hook.active = False, False
        return out[:, :x.shape[1]] if out.dim() == 4 and out.shape[1] == 2 * x.shape[1] else out

    def close(self) -> None:
        """Remove the hooks and restore the attention layer (idempotent)."""
        while self.handles:
            self.handles.pop().remove()
        if self.hook is not None:
            self.hook.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cfg_half(n: int, cfg: bool, first: bool) -> slice:
    if not cfg:
        return slice(0, n)
    return slice(0, n // 2) if first else slice(n // 2, n)


class SAGOnPipeline(PipelineGuidance):
    """``sg.sag``: self-attention guidance on the pipeline's own forward (see the module docstring)."""

    def __init__(self, pipe, scale=0.75, layer=None, window=None, threshold=1.0, blur=(9, 1.0), backend="auto"):
        check_sag_args(blur, None, threshold)
        super().__init__(pipe, scale, layer, window, backend)
        self.threshold, self.blur = float(threshold), (int(blur[0]), float(blur[1]))
        self.param = scheduler_param(pipe.scheduler, sigmas=self.kind.sigmas)
        self._install(self.adapter.capture(self.layer, backend))

    def rows(self, n, cfg):  # the unconditional samples: [uncond; cond], or DiT's [cond; uncond]
        return _cfg_half(n, cfg, not self.kind.cond_first)

    def before(self, step):
        self.hook.active = step is not None
        self.hook.rows = step.rows if step is not None else None

    def term(self, step, pred):
        x, t, grid = step.x[step.rows], step.t[step.rows], self.hook.grid
        latent = self.kind.to_latent(x, grid)
        x0_latent = sag_degraded(self.param, latent, self.kind.to_latent(pred, grid), self.hook.mass, t,
                                 self.threshold, self.blur, self.backend)
        x_deg = self.kind.from_latent(x0_latent).to(x.dtype)
        return sag_delta(self.param, x, x_deg, pred, self.extra_forward(step, x_deg, False), t)


class PerturbedOnPipeline(PipelineGuidance):
    """``sg.pag`` / ``sg.seg``: d = cond - cond_perturbed (see the module docstring)."""

    def __init__(self, pipe, mode: str, scale=3.0, layer=None, window=None, sigma=None):
        super().__init__(pipe, scale, layer, window)
        self._install(self.adapter.perturb(self.layer, mode, sigma=sigma))

    def rows(self, n, cfg):  # the conditional samples
        return _cfg_half(n, cfg, self.kind.cond_first)

    def term(self, step, pred):
        return pred.float() - self.extra_forward(step, step.x[step.rows], True).float()


def sag(pipe, scale: float = 0.75, layer: str | None = None, window=None, threshold: float = 1.0,
        blur=(9, 1.0), backend: str = "auto") -> SAGOnPipeline:
    """Self-attention guidance on a diffusers pipeline while the ``with`` block runs (module docstring)."""
    return SAGOnPipeline(pipe, scale, layer, window, threshold, blur, backend)


def pag(pipe, scale: float = 3.0, layer: str | None = None, window=None) -> PerturbedOnPipeline:
    """Perturbed-attention guidance: identity attention on ``layer``'s image-image block."""
    return PerturbedOnPipeline(pipe, "pag", scale, layer, window)


def seg(pipe, scale: float = 3.0, layer: str | None = None, window=None, sigma: float = 10.0) -> PerturbedOnPipeline:
    """Smoothed-energy guidance: ``layer``'s image queries blurred with ``sigma`` on their grid
    (above 9999.9: replaced by their mean, the paper's infinite blur)."""
    return PerturbedOnPipeline(pipe, "seg", scale, layer, window, sigma)
