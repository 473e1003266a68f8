"""Training configuration: a frozen dataclass, named presets, strict overrides.

Presets follow the papers' tables (appendix Tables 8-10); ``digits`` is the embedded
default main job and ``tiny`` the test model. Overrides come from the command line
(``--steps 100 --model.channels 64``) or a JSON file; an unknown key fails loudly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields

from .models.unet import UNET_PRESETS, UNetConfig
from .models.uvit import UVIT_PRESETS, UViTConfig

CONDITIONS = ("self-labels", "labels", "annotations", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile


@dataclass(frozen=True)
class OnlineConfig:
    """Online self-guidance (SPEC section 2): prototypes clustered from the model's own features."""
    enabled: bool = False
    prototypes: int = 100  # K prototypes (K x d, bias-free, re-normalised every step)
    feature: str = "cls"  # 'cls': mid-block CLS token; 'patches': every mid-block patch token
    head_hidden: int = 512  # projection head Linear(d, 512) BN ReLU Linear(512, d)
    temperature: float = 0.1  # of log_softmax(logits / temperature)
    sk_eps: float = 0.05  # Sinkhorn-Knopp epsilon
    sk_iters: int = 3
    t_low: float = 0.8  # feature-time window (authors' code: t in (0.8, 0.9), t=1 data)
    t_high: float = 0.9
    stage_switch: float = 0.5  # sigma: the first sigma*N steps are unconditional
    p_drop: float = 0.15  # stage-2 condition dropout to the learned null token


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "digits"
    data: str = "digits"  # 'digits', an image folder, or an .npz/.npy array
    out: str = "runs/digits"
    model: UNetConfig = field(default_factory=lambda: UNET_PRESETS["digits"])
    objective: str = "ddpm"  # 'ddpm' (eps, linear betas), 'edm' (cluster-conditioned EDM), 'flow'
    arch: str = "unet"  # 'unet' (configured by model.*) or 'uvit' (configured by uvit.*)
    uvit: UViTConfig = field(default_factory=lambda: UVIT_PRESETS["uvit-tiny"])
    online: OnlineConfig = field(default_factory=OnlineConfig)
    condition: str = "self-labels"  # one of CONDITIONS
    annotations: str = ""  # annotation file from `python -m sgengine.annotate` (condition='annotations')
    k: int = 10  # clusters for in-process self-labels
    pca_dim: int = 0  # in-process self-labels: k-means on PCA of pixels (0 = raw pixels; best NMI on digits)
    steps: int = 1500  # digits: ~6 min on 2 CPU cores; rows of the grid are distinct digits
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100  # linear lr warmup steps (500 in the paper)
    ema_max: float = 0.9999  # EMA decay = min(ema_max, (1 + n) / (10 + n))
    grad_clip: float = 1.0
    p_uncond: float = 0.1  # CFG training: per-sample condition dropout
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    hflip: bool = False
    log_every: int = 25
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_steps: int = 50  # sampler steps for the grids (DDIM 50 for quick validation; EDM Heun 18)
    sampler: str = ""  # '' = the objective's default (ddim / heun / euler)
    guidance_w: float = 2.0
    grid_rows: int = 10
    grid_cols: int = 8
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # Evaluation during training: Frechet distance of EMA samples, best checkpoint kept.
    eval_every: int = 0  # 0: off
    eval_ref: str = ""  # reference: folder, .npz of images, or cached stats .npz
    eval_n: int = 2000  # samples per evaluation
    eval_features: str = ""  # feature network: '' = Inception (local weights), or a classifier file
    # Scale-out and throughput.
    deepspeed: bool = False  # train through DeepSpeed (pip install sgengine[deepspeed])
    zero_stage: int = 0  # ZeRO stage 0-3 with --deepspeed
    grad_accum: int = 1  # gradient accumulation steps
    ds_config: str = ""  # user DeepSpeed JSON overriding the generated config
    compile: bool = False  # torch.compile the model (falls back to eager when compile fails)
    # torch.compile mode: 'reduce-overhead' replays the step's kernels as CUDA graphs (static shapes).
    compile_mode: str = "default"
    channels_last: bool = False
    # Data at scale (sgengine.data): packs, float arrays and latents.
    data_resize: bool = False  # resize an --data array of another size to the model's (else it is refused)
    resume: bool = False

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.arch not in ("unet", "uvit"):
            raise ValueError(f"arch must be 'unet' or 'uvit', got {self.arch!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.objective not in ("ddpm", "edm", "flow"):
            raise ValueError(f"objective must be 'ddpm', 'edm' or 'flow', got {self.objective!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        for name in ("steps", "batch_size", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def check_runnable(cfg: TrainConfig) -> None:
    """Checks that need the whole configuration (presets may leave the annotation file to the user)."""
    if cfg.condition == "annotations" and not cfg.annotations:
        raise ValueError(f"preset {cfg.preset!r} trains on an annotation file: pass --annotations FILE "
                         "(make one with `python -m sgengine.annotate --data DIR --out FILE`)")


def _paper(model: str, **kw) -> TrainConfig:
    return TrainConfig(preset=model, model=UNET_PRESETS[model], condition="annotations",
                       weight_decay=0.01, warmup=500, ckpt_every=5000, sample_every=5000,
                       sample_steps=50, grid_cols=8, **kw)


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
    # Online self-guidance (SPEC section 2): U-ViT + flow matching, prototypes from its own features.
    # Tiny: 8x8 digits on the CPU; a wider window (0.6, 0.9) so small batches hold in-window samples.
    "uvit-tiny-online": TrainConfig(preset="uvit-tiny-online", out="runs/uvit-tiny-online", arch="uvit",
                                    objective="flow", condition="none", model=UNET_PRESETS["tiny"],
                                    uvit=UVIT_PRESETS["uvit-tiny"], steps=40, batch_size=64, warmup=5,
                                    online=OnlineConfig(enabled=True, prototypes=10, head_hidden=128,
                                                        t_low=0.6, t_high=0.9),
                                    log_every=5, ckpt_every=20, sample_steps=5, guidance_w=1.4,
                                    grid_rows=4, grid_cols=2),
    # U-ViT-S/2 on 32x32x3 images, U-ViT-M/2 on 32x32x4 latents (--data ARRAY); paper Table 4 (ImageNet100:
    # K=300, batch 512, lr 5e-5, no weight decay, 5K warm-up, 40K iterations); g=0.4 is w=1.4.
    "uvit-s-online": TrainConfig(preset="uvit-s-online", out="runs/uvit-s-online", arch="uvit", objective="flow",
                                 condition="none", model=UNET_PRESETS["in32"], uvit=UVIT_PRESETS["uvit-s"],
                                 online=OnlineConfig(enabled=True, prototypes=300), lr=5e-5, weight_decay=0.0,
                                 batch_size=512, steps=40_000, warmup=5000, ckpt_every=5000, sample_every=5000,
                                 guidance_w=1.4, hflip=True),
    "uvit-m-online": TrainConfig(preset="uvit-m-online", out="runs/uvit-m-online", arch="uvit", objective="flow",
                                 condition="none", model=dataclasses.replace(UNET_PRESETS["in32"], in_channels=4),
                                 uvit=UVIT_PRESETS["uvit-m"], online=OnlineConfig(enabled=True, prototypes=300),
                                 lr=5e-5, weight_decay=0.0, batch_size=512, steps=40_000, warmup=5000,
                                 ckpt_every=5000, sample_every=5000, guidance_w=1.4),
}

# -- Latent diffusion at 256x256 (sgengine.data; issue 15). --data is a latent pack of the SD VAE
# (ft-EMA): python -m sgengine.data pack SRC P --size 256; python -m sgengine.data encode P L --vae DIR.
# Online self-guidance paper, Table 4: U-ViT-L/2 on 32x32x4 latents, OT flow matching, batch 512, AdamW
# lr 5e-5, no weight decay, 5K warm-up, p_uncond 0.1 (also the stage-2 drop), dopri sampler, g=0.4 (w=1.4);
# ImageNet100x256: K=300, 40K iterations; ImageNet256: K=5,000, 300K; LSUN-Churches256: K=30, 100K.
# No flips: a flipped image's latent is not the flipped latent.
LATENT_UNET = dataclasses.replace(UNET_PRESETS["in32"], in_channels=4)  # unused by the U-ViT runs


def _latent_online(name: str, k: int, steps: int) -> TrainConfig:
    return TrainConfig(preset=name, out=f"runs/{name}", arch="uvit", objective="flow", condition="none",
                       model=LATENT_UNET, uvit=UVIT_PRESETS["uvit-l"],
                       online=OnlineConfig(enabled=True, prototypes=k, p_drop=0.1), lr=5e-5, weight_decay=0.0,
                       batch_size=512, steps=steps, warmup=5000, p_uncond=0.1, sampler="dopri5", guidance_w=1.4,
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


def _convert(value: str, like):
    """Parse a command-line string to the type of the field's current value."""
    if isinstance(like, bool):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean (true/false), got {value!r}")
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, tuple):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return type(like)(value)


def apply_overrides(cfg, overrides: dict):
    """Replace fields of a (nested) frozen dataclass; 'model.channels' reaches the UNet config."""
    top, nested = {}, {}
    names = {f.name for f in fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise KeyError(f"unknown config key {key!r} for {type(cfg).__name__}; known: {sorted(names)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            current = getattr(cfg, head)
            top[head] = _convert(value, current) if isinstance(value, str) and not isinstance(current, str) else value
    for head, sub in nested.items():
        top[head] = apply_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **top)


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _from_plain(cls_default, d: dict):
    """Rebuild a (nested) frozen dataclass from JSON-like values; unknown keys fail loudly."""
    names = {f.name for f in fields(cls_default)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown config keys {sorted(unknown)} for {type(cls_default).__name__}")
    out = {}
    for key, value in d.items():
        current = getattr(cls_default, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            out[key] = _from_plain(current, value)
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(cls_default, **out)


def from_dict(d: dict) -> TrainConfig:
    """Inverse of to_dict; unknown keys fail loudly."""
    return _from_plain(TrainConfig(), d)


def _flag_names(cfg, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _flag_names(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, value))
    return out


def build_parser(prog: str = "python -m sgengine.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a self-guided diffusion model. "
                                "With no arguments: self-labeled guidance on scikit-learn's digits (CPU, minutes).")
    p.add_argument("--config", help="JSON file of overrides (unknown keys fail)")
    for name, value in _flag_names(TrainConfig()):
        if name == "resume":
            p.add_argument("--resume", action="store_true", default=None,
                           help="continue from the last checkpoint in --out")
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        p.add_argument(f"--{name}", dest=name, default=None, metavar=type(value).__name__.upper(),
                       help=f"(digits default: {shown})")
    return p


def parse_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    cfg = preset(args.pop("preset") or "digits")
    if args.get("config"):
        with open(args["config"]) as fh:
            cfg = apply_overrides(cfg, json.load(fh))
    args.pop("config")
    overrides = {k: v for k, v in args.items() if v is not None}
    if overrides.get("resume") is True:
        overrides["resume"] = True
    return apply_overrides(cfg, overrides)
