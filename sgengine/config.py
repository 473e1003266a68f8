"""Training configuration: a frozen dataclass, named presets, typed and checked overrides.

Presets follow the papers' tables (appendix Tables 8-10); ``digits`` is the embedded default main
job and ``tiny`` the test model. Overrides come from the command line (``--steps 100
--model.channels 64``) or a JSON file (``--config``, nested or dotted keys); both are converted by
the fields' type hints and checked against their ranges and choices before any work, and an
unknown key fails loudly.

The parser is our own small layer over argparse (``sgengine.common.flags``), not tyro or
simple-parsing. Both libraries derive flags from dataclass hints as we do, but neither gives the
engine's contract without wrapping: tyro prints multi-line boxed errors and has no JSON
``--config`` conversion; simple-parsing converts by hint but validates no ranges, and its errors are
argparse's usage block. Either would add a dependency for the ~150 lines that give one-line
``error: --flag ...`` messages (exit 2), ranges from ``Annotated`` hints shared with the Python
API, JSON files converted like flags, and the same flags for every CLI.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from .common.flags import (ConfigError, Count, FlagParser, Fraction, NonNeg, NonNegInt, Positive, Range,
                           add_dataclass_flags, collect, flat_fields, from_plain, validate)
from .device import device_problem
from .diffusion.edm import EDM_PRESETS, EDMConfig
from .diffusion.flow import SIGMA_MIN
from .diffusion.samplers import SAMPLERS
from .models.unet import UNET_PRESETS, UNetConfig
from .models.uvit import UVIT_PRESETS, UViTConfig

Condition = Literal["self-labels", "labels", "annotations", "none"]
CONDITIONS = typing.get_args(Condition)
# torch.compile modes; 'reduce-overhead' replays the step's kernels as CUDA graphs (static shapes).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = typing.get_args(CompileMode)
# '' = the objective's default (ddim / heun / euler); every sampler runs on every objective.
Sampler = Literal[("", *sorted(SAMPLERS))]
Beta = Annotated[float, Range(gt=0, lt=1)]


@dataclass(frozen=True)
class OnlineConfig:
    """Online self-guidance (SPEC section 2): prototypes clustered from the model's own features."""
    enabled: bool = False
    prototypes: Count = 100  # K prototypes (K x d, bias-free, re-normalised every step)
    feature: Literal["cls", "patches"] = "cls"  # 'cls': mid-block CLS token; 'patches': every patch token
    head_hidden: Count = 512  # projection head Linear(d, 512) BN ReLU Linear(512, d)
    temperature: Positive = 0.1  # of log_softmax(logits / temperature)
    sk_eps: Positive = 0.05  # Sinkhorn-Knopp epsilon
    sk_iters: Count = 3  # Sinkhorn-Knopp iterations
    t_low: Annotated[float, Range(ge=0, le=1)] = 0.8  # feature-time window (authors' code: (0.8, 0.9), t=1 data)
    t_high: Annotated[float, Range(ge=0, le=1)] = 0.9  # upper end of the feature-time window
    stage_switch: Annotated[float, Range(ge=0, le=1)] = 0.5  # sigma: the first sigma*N steps are unconditional
    p_drop: Fraction = 0.15  # stage-2 condition dropout to the learned null token

    def __post_init__(self):
        validate(self)
        if self.t_low >= self.t_high:
            raise ConfigError("t_low", f"must be below t_high ({self.t_high}), got {self.t_low}")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "digits"  # the preset these settings started from
    data: str = "digits"  # 'digits', an image folder, or an .npz/.npy array
    out: str = "runs/digits"  # run folder: checkpoints, samples, metrics
    objective: Literal["ddpm", "edm", "flow"] = "ddpm"  # ddpm: eps on linear betas; edm: C-EDM; flow: matching
    arch: Literal["unet", "uvit"] = "unet"  # unet: configured by model.*; uvit: by uvit.*
    model: UNetConfig | None = field(default_factory=lambda: UNET_PRESETS["digits"])  # UNet (arch unet only)
    uvit: UViTConfig | None = None  # U-ViT (arch uvit only)
    edm: EDMConfig | None = None  # EDM schedule, loss and sampler settings (objective edm only)
    flow_sigma_min: Annotated[float, Range(ge=0, lt=1)] = SIGMA_MIN  # flow path's data-end noise floor
    online: OnlineConfig = field(default_factory=OnlineConfig)
    condition: Condition = "self-labels"  # what the model is conditioned on
    annotations: str = ""  # annotation file from `python -m sgengine.annotate` (condition annotations)
    k: Count = 10  # clusters for in-process self-labels
    pca_dim: NonNegInt = 0  # self-labels: k-means on PCA of pixels (0 = raw pixels; best NMI on digits)
    steps: Count = 1500  # optimizer steps (digits: ~6 min on 2 CPU cores)
    batch_size: Count = 32  # images per rank and forward (global: batch_size x world x grad_accum)
    lr: Positive = 2e-3  # peak learning rate (AdamW)
    weight_decay: NonNeg = 0.01  # AdamW weight decay
    warmup: NonNegInt = 100  # linear lr warmup steps (500 in the paper)
    ema_max: Fraction = 0.9999  # EMA decay = min(ema_max, (1 + n) / (10 + n))
    grad_clip: NonNeg = 1.0  # gradient norm clip (0 = off)
    p_uncond: Fraction = 0.1  # CFG training: per-sample condition dropout
    T: Count = 1000  # DDPM timesteps
    beta_start: Beta = 1e-4  # DDPM linear betas: first
    beta_end: Beta = 0.02  # DDPM linear betas: last
    hflip: bool = False  # random horizontal flips
    log_every: Count = 25  # steps between metric lines
    sample_every: NonNegInt = 0  # steps between sample grids (0: only at the end)
    ckpt_every: NonNegInt = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: NonNegInt = 2  # newest checkpoints kept (0: all)
    sample_steps: Count = 50  # sampler steps for the grids (DDIM 50 for quick validation; EDM Heun 18)
    sampler: Sampler = ""  # '' = the objective's default (ddim / heun / euler)
    guidance_w: NonNeg = 2.0  # CFG scale of the grids
    grid_rows: Count = 10  # rows (clusters) of the sample grid
    grid_cols: Count = 8  # samples per row
    seed: int = 0  # seeds data order, noise and initialisation
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    eval_every: NonNegInt = 0  # steps between Frechet-distance evaluations of EMA samples (0: off)
    eval_ref: str = ""  # reference: folder, .npz of images, or cached stats .npz
    eval_n: Annotated[int, Range(ge=2)] = 2000  # samples per evaluation
    eval_features: str = ""  # feature network: '' = Inception (local weights), or a classifier file
    deepspeed: bool = False  # train through DeepSpeed (pip install sgengine[deepspeed])
    zero_stage: Literal[0, 1, 2, 3] = 0  # ZeRO stage with --deepspeed
    grad_accum: Count = 1  # gradient accumulation steps
    ds_config: str = ""  # user DeepSpeed JSON overriding the generated config
    compile: bool = False  # torch.compile the model (falls back to eager when compile fails)
    compile_mode: CompileMode = "default"  # torch.compile mode
    channels_last: bool = False  # channels-last memory format
    data_resize: bool = False  # resize an --data array of another size to the model's (else it is refused)
    resume: bool = False  # continue from the last checkpoint in out

    def __post_init__(self):
        validate(self)
        for name, owner, used in (("model", "arch", self.arch == "unet"), ("uvit", "arch", self.arch == "uvit"),
                                  ("edm", "objective", self.objective == "edm")):
            if used and getattr(self, name) is None and name != "edm":  # edm None: EDMConfig()'s defaults
                raise ConfigError(name, f"must be set for arch {self.arch!r} (a preset or {name}.* settings)")
            if not used and getattr(self, name) is not None:
                want = {"model": "unet", "uvit": "uvit", "edm": "edm"}[name]
                raise ConfigError(name, f"settings apply to {owner} {want!r} only, not {getattr(self, owner)!r}: "
                                  f"set {owner} {want} (or a preset that does), or drop them")

    @property
    def network(self) -> UNetConfig | UViTConfig:
        """The configuration of the network ``arch`` names."""
        return self.uvit if self.arch == "uvit" else self.model


def check_runnable(cfg: TrainConfig) -> None:
    """Checks that need the whole configuration, or a file it names, and no data: they run before
    any work (the train CLI's k-means included) and again in the trainer; each names its flag."""
    if cfg.data != "digits" and not os.path.exists(cfg.data):
        raise ConfigError("data", f"{cfg.data} does not exist: pass 'digits', an image folder, a pack, or an "
                          ".npz/.npy array")
    for check in (_check_condition, _check_schedule, _check_deepspeed, _check_eval, _check_online):
        check(cfg)
    problem = device_problem(cfg.device)
    if problem:
        raise ConfigError("device", problem)


def _check_condition(cfg: TrainConfig) -> None:
    make = "make one with `python -m sgengine.annotate --data DIR --out FILE`"
    if cfg.condition == "annotations" and not cfg.annotations:
        raise ConfigError("annotations", f"must name a file: preset {cfg.preset!r} trains on an annotation file "
                          f"({make})")
    if cfg.annotations and cfg.condition != "annotations":
        raise ConfigError("annotations", f"is read only with --condition annotations, and the condition is "
                          f"{cfg.condition!r}: add --condition annotations, or drop --annotations")
    if cfg.annotations and not os.path.isfile(cfg.annotations):
        raise ConfigError("annotations", f"{cfg.annotations} is not a file: pass an annotation file ({make})")


def _check_schedule(cfg: TrainConfig) -> None:
    if cfg.objective == "ddpm" and cfg.beta_start >= cfg.beta_end:
        raise ConfigError("beta_start", f"must be below --beta_end ({cfg.beta_end}), got {cfg.beta_start}: "
                          "the linear schedule rises from beta_start to beta_end (DDPM: 1e-4 to 0.02)")


def _check_deepspeed(cfg: TrainConfig) -> None:
    for key, given in (("zero_stage", cfg.zero_stage != 0), ("ds_config", bool(cfg.ds_config))):
        if given and not cfg.deepspeed:
            raise ConfigError(key, "applies only under DeepSpeed: add --deepspeed true, or drop it")
    if cfg.ds_config and not os.path.isfile(cfg.ds_config):
        raise ConfigError("ds_config", f"{cfg.ds_config} is not a file: pass a DeepSpeed JSON file, or leave it empty")
    if cfg.ds_config:
        _read_json(cfg.ds_config, "ds_config")


def _check_eval(cfg: TrainConfig) -> None:
    if cfg.eval_every and not cfg.eval_ref:
        raise ConfigError("eval_every", "needs a reference: add --eval_ref DIR|images.npz|stats.npz, or set "
                          "--eval_every 0")
    if cfg.eval_ref and not os.path.exists(cfg.eval_ref):
        raise ConfigError("eval_ref", f"{cfg.eval_ref} does not exist: pass an image folder, an .npz of images "
                          "or of cached statistics")


def _check_online(cfg: TrainConfig) -> None:
    """Online self-guidance's requirements (SPEC section 2), each with its fix."""
    if not cfg.online.enabled:
        return
    preset_hint = "(or --preset uvit-tiny-online)"
    if cfg.arch != "uvit" or cfg.objective != "flow":
        raise ConfigError("online.enabled", f"trains a U-ViT with flow matching, not arch {cfg.arch!r} with "
                          f"objective {cfg.objective!r}: add --arch uvit --objective flow {preset_hint}")
    if cfg.condition != "none":
        raise ConfigError("condition", f"must be 'none' with --online.enabled true (the prototypes are the "
                          f"conditions), got {cfg.condition!r}: pass --condition none")
    if cfg.deepspeed:
        raise ConfigError("deepspeed", "does not apply to online self-guidance, which scales out with torch DDP "
                          "(its head and prototypes live outside the DeepSpeed engine): drop --deepspeed")
    if cfg.online.feature == "patches" and not cfg.uvit.patch_cond:
        raise ConfigError("online.feature", "patches adds a prototype to every patch token: add "
                          "--uvit.patch_cond true")


def _paper(model: str, **kw) -> TrainConfig:
    return TrainConfig(preset=model, model=UNET_PRESETS[model], condition="annotations",
                       weight_decay=0.01, warmup=500, ckpt_every=5000, sample_every=5000,
                       sample_steps=50, grid_cols=8, **kw)


def _online(name: str, uvit: UViTConfig, **kw) -> TrainConfig:
    return TrainConfig(preset=name, out=f"runs/{name}", arch="uvit", objective="flow", condition="none",
                       model=None, uvit=uvit, **kw)


PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(),
    "tiny": TrainConfig(preset="tiny", model=UNET_PRESETS["tiny"], out="runs/tiny", steps=30, batch_size=16,
                        lr=2e-3, warmup=5, k=4, pca_dim=8, log_every=5, ckpt_every=10, sample_steps=5,
                        grid_rows=4, grid_cols=2),
    # Table 8: ImageNet32, batch 128, lr 3e-4; self-labels K=5000 from DINO features.
    "in32": _paper("in32", out="runs/in32", lr=3e-4, batch_size=128, steps=1_000_000, hflip=True),
    # Table 9: ImageNet64, batch 48, lr 1e-4.
    "in64": _paper("in64", out="runs/in64", lr=1e-4, batch_size=48, steps=1_000_000, hflip=True),
    # Table 10: 64x64 self-boxed / self-segmented guidance, batch 80, lr 1e-4.
    "box64": _paper("box64", out="runs/box64", lr=1e-4, batch_size=80, steps=500_000),
    "seg64": _paper("seg64", out="runs/seg64", lr=1e-4, batch_size=80, steps=500_000),
    # Cluster-conditioned EDM (SPEC section 3) on 32x32 TEMI clusters: EDM's CIFAR-10 settings
    # (sigma in [0.002, 80], rho 7, Heun 18 steps), batch 512, lr 1e-3 (EDM Table 7).
    "cedm32": TrainConfig(preset="cedm32", out="runs/cedm32", objective="edm", edm=EDM_PRESETS["cifar-cedm"],
                          model=UNET_PRESETS["in32"], condition="annotations", lr=1e-3, batch_size=512,
                          steps=400_000, warmup=5000, ckpt_every=5000, sample_every=5000, sample_steps=18,
                          hflip=True),
    # Online self-guidance (SPEC section 2): U-ViT + flow matching, prototypes from its own features.
    # Tiny: 8x8 digits on the CPU; a wider window (0.6, 0.9) so small batches hold in-window samples.
    "uvit-tiny-online": _online("uvit-tiny-online", UVIT_PRESETS["uvit-tiny"], steps=40, batch_size=64, warmup=5,
                                online=OnlineConfig(enabled=True, prototypes=10, head_hidden=128,
                                                    t_low=0.6, t_high=0.9),
                                log_every=5, ckpt_every=20, sample_steps=5, guidance_w=1.4, grid_rows=4,
                                grid_cols=2),
    # U-ViT-S/2 on 32x32x3 images, U-ViT-M/2 on 32x32x4 latents (--data ARRAY); paper Table 4 (ImageNet100:
    # K=300, batch 512, lr 5e-5, no weight decay, 5K warm-up, 40K iterations); g=0.4 is w=1.4.
    "uvit-s-online": _online("uvit-s-online", UVIT_PRESETS["uvit-s"], online=OnlineConfig(enabled=True, prototypes=300),
                             lr=5e-5, weight_decay=0.0, batch_size=512, steps=40_000, warmup=5000, ckpt_every=5000,
                             sample_every=5000, guidance_w=1.4, hflip=True),
    "uvit-m-online": _online("uvit-m-online", UVIT_PRESETS["uvit-m"], online=OnlineConfig(enabled=True, prototypes=300),
                             lr=5e-5, weight_decay=0.0, batch_size=512, steps=40_000, warmup=5000, ckpt_every=5000,
                             sample_every=5000, guidance_w=1.4),
}

# -- Latent diffusion at 256x256 (sgengine.data; issue 15). --data is a latent pack of the SD VAE
# (ft-EMA): python -m sgengine.data pack SRC P --size 256; python -m sgengine.data encode P L --vae DIR.
# Online self-guidance paper, Table 4: U-ViT-L/2 on 32x32x4 latents, OT flow matching, batch 512, AdamW
# lr 5e-5, no weight decay, 5K warm-up, p_uncond 0.1 (also the stage-2 drop), dopri sampler, g=0.4 (w=1.4);
# ImageNet100x256: K=300, 40K iterations; ImageNet256: K=5,000, 300K; LSUN-Churches256: K=30, 100K.
# No flips: a flipped image's latent is not the flipped latent.


def _latent_online(name: str, k: int, steps: int) -> TrainConfig:
    return _online(name, UVIT_PRESETS["uvit-l"], online=OnlineConfig(enabled=True, prototypes=k, p_drop=0.1),
                   lr=5e-5, weight_decay=0.0, batch_size=512, steps=steps, warmup=5000, p_uncond=0.1,
                   sampler="dopri5", guidance_w=1.4,
                   ckpt_every=4000, sample_every=4000)  # the paper picks the best FID every 4,000 iterations


PRESETS.update({
    "uvit-l-in256-100": _latent_online("uvit-l-in256-100", 300, 40_000),
    "uvit-l-in256": _latent_online("uvit-l-in256", 5000, 300_000),
    "uvit-l-churches256": _latent_online("uvit-l-churches256", 30, 100_000),
    # Self-guided paper, appendix Table 11 (Churches-256, its LDM): the UNet on 32x32x4 latents, base 128
    # channels, multipliers 1,2,2,3,4, 2 blocks a level, attention at downsampling 4 and 8, 8 heads,
    # condition embedding 256; linear schedule, AdamW lr 5e-5, batch 48, weight decay 0.01, 600K steps,
    # 200 sampling steps; self-labels from `python -m sgengine.annotate` (--condition annotations).
    "ldm-churches256": TrainConfig(preset="ldm-churches256", out="runs/ldm-churches256", condition="annotations",
                                   model=UNetConfig(img_size=32, in_channels=4, channels=128,
                                                    channel_mult=(1, 2, 2, 3, 4), num_res_blocks=2,
                                                    attention_ds=(4, 8), heads=8, cond_embed_dim=256),
                                   lr=5e-5, batch_size=48, weight_decay=0.01, steps=600_000, warmup=500,
                                   ckpt_every=5000, sample_every=5000, sample_steps=200, grid_cols=8),
})


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def _switch_parts(cfg: TrainConfig, overrides: dict) -> dict:
    """A new arch or objective swaps the sub-config it uses in (defaults) and the unused one out,
    unless the overrides set them explicitly."""
    out = dict(overrides)
    given = {k.partition(".")[0] for k in out}
    arch, objective = out.get("arch", cfg.arch), out.get("objective", cfg.objective)
    for name, used in (("model", arch == "unet"), ("uvit", arch == "uvit"), ("edm", objective == "edm")):
        if name in given:
            continue
        if used and getattr(cfg, name) is None:
            out[name] = {}  # the sub-config's defaults
        elif not used and getattr(cfg, name) is not None:
            out[name] = None
    return out


def apply_overrides(cfg, overrides: dict):
    """Replace fields of a (nested) frozen config: 'model.channels' or {'model': {'channels': ..}} reach
    the UNet config; strings are converted by the type hints; every value is checked (ConfigError)."""
    if isinstance(cfg, TrainConfig):
        overrides = _switch_parts(cfg, overrides)
    return from_plain(type(cfg), cfg, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """Inverse of to_dict (a checkpoint's meta.json); unknown keys fail loudly. Checkpoints written
    before unused sub-configs became None carried both networks: the one ``arch`` does not use is dropped."""
    d = {**d, ("model" if d.get("arch") == "uvit" else "uvit"): None}
    return from_plain(TrainConfig, TrainConfig(), d)


def build_parser(prog: str = "python -m sgengine.train") -> FlagParser:
    p = FlagParser(prog=prog, usage="%(prog)s [--preset NAME] [--config FILE] [--resume] [--KEY VALUE ...]",
                   description="Train a self-guided diffusion model. With no arguments: "
                   "self-labeled guidance on scikit-learn's digits (CPU, minutes).")
    p.add_argument("--preset", metavar="{" + ",".join(PRESETS) + "}", help="settings to start from (default: digits)")
    p.add_argument("--config", metavar="FILE", help="JSON file of settings (nested or dotted keys; checked like flags)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
    add_dataclass_flags(p, TrainConfig, PRESETS["digits"], skip={"preset", "resume"})
    return p


def _read_json(path: str, key: str = "config") -> dict:
    try:
        with open(path) as fh:
            values = json.load(fh)
    except OSError as err:
        raise ConfigError(key, f"cannot read {path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"{err.msg}, line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not text"
        raise ConfigError(key, f"{path} is not valid JSON ({where})") from None
    if not isinstance(values, dict):
        raise ConfigError(key, f"{path} must hold a JSON object of settings")
    return values


def config_from_args(args) -> TrainConfig:
    """The preset, then the --config file, then the flags; ConfigError names the first bad one."""
    cfg = preset(args.preset or "digits")
    if args.config:
        cfg = apply_overrides(cfg, _read_json(args.config))
    flags = collect(args, [key for key, *_ in flat_fields(TrainConfig, cfg)])
    if args.resume:
        flags["resume"] = True
    cfg = apply_overrides(cfg, flags)
    check_runnable(cfg)
    return cfg


def parse_args(argv=None, parser: FlagParser | None = None) -> TrainConfig:
    """The command line as a checked TrainConfig; a bad value exits 2 with one ``error:`` line."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as err:
        parser.fail(err)
