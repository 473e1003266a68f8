"""DeepSpeed glue: the config generated from TrainConfig, the engine, EMA and checkpoints.

DeepSpeed is optional (``pip install deepspeed``); nothing here imports it until a run
asks for ``--deepspeed true``. The trainer's own warmup (a LambdaLR) drives DeepSpeed's
optimizer because DeepSpeed's WarmupLR spends its first step at ``warmup_min_lr`` and
so cannot reproduce ``lr * min(1, (step + 1) / warmup)``; a ``scheduler`` section in
the user's JSON takes over instead. Weights are consolidated to full fp32 tensors for
the sampler's safetensors under every ZeRO stage; DeepSpeed's own sharded state (for
``--resume``) lives in the checkpoint's ``deepspeed/`` subfolder.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import TrainConfig
from ..common.io import naming_a_full_disk
from ..common.ranks import DistInfo, barrier
from .ema import ema_update

DS_TAG = "ds"  # one tag per folder: each checkpoint folder holds exactly one DeepSpeed state
CHANNELS_LAST_WITH_DS = ("DeepSpeed flattens parameters and fails on channels_last conv weights: "
                         "drop --channels_last with --deepspeed")
INSTALL_HINT = "pip install deepspeed (CPU works with DS_BUILD_OPS=0, the default)"


def require_deepspeed():
    # DeepSpeed's op builder parses TORCH_CUDA_ARCH_LIST as numbers and fails on "9.0a" (SPEC section 5).
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if re.search(r"\d\.\da", arch):
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d\.\d)a", r"\1", arch)
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"--deepspeed true needs DeepSpeed: {INSTALL_HINT} ({err})") from err
    return deepspeed


def generated_config(cfg: TrainConfig, device: torch.device) -> dict:
    """The DeepSpeed config that reproduces the plain trainer's optimisation."""
    optimizer = {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay,
                 "torch_adam": True}  # torch's AdamW: DeepSpeed's fused ops need a compiler build
    if device.type == "cuda":
        optimizer["fused"] = True
    return {"train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": bool(cfg.bf16 and device.type == "cuda")},
            "optimizer": {"type": "AdamW", "params": optimizer},
            "zero_optimization": {"stage": cfg.zero_stage},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` wins; nested dicts merge key by key; unknown keys pass through."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_config(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ds_config {path!r} does not exist; pass a DeepSpeed JSON file or leave it empty")
    try:
        user = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--ds_config {path} is not valid JSON: {err}") from err
    if not isinstance(user, dict):
        raise ValueError(f"--ds_config {path} must hold a JSON object of DeepSpeed settings")
    return user


def ds_config(cfg: TrainConfig, device: torch.device) -> dict:
    """Generated config, deep-merged with the user's --ds_config."""
    base = generated_config(cfg, device)
    return deep_merge(base, load_user_config(cfg.ds_config)) if cfg.ds_config else base


def initialize(net: torch.nn.Module, cfg: TrainConfig, device: torch.device, lr_lambda):
    """The DeepSpeed engine around ``net`` (which stays ``engine.module``)."""
    deepspeed = require_deepspeed()
    conf = ds_config(cfg, device)
    if any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters()):
        raise ValueError(CHANNELS_LAST_WITH_DS)
    sched = None if "scheduler" in conf else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=conf,
                                      lr_scheduler=sched)
    return engine


def gathered(engine):
    """ZeRO-3 parameters are placeholders until gathered (on every rank, read-only)."""
    if engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Full fp32 parameters (the optimizer's master copy under bf16); collective: call on all ranks."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        out[name] = master if master is not None else p.detach()
    if any(v.numel() == 0 for v in out.values()):  # a ZeRO-3 optimizer without hp mappings
        with gathered(engine):
            out = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return out


def update_ema(ema: torch.nn.Module, engine, decay: float) -> None:
    """EMA of the full weights; every rank keeps the same full-size EMA copy."""
    if next(engine.module.parameters()).dtype == torch.float32:
        with gathered(engine):
            ema_update(ema, engine.module, decay)
        return
    masters = full_params(engine)  # bf16/fp16 module weights would round the average; use fp32 masters
    with torch.no_grad():
        torch._foreach_lerp_([p for _, p in ema.named_parameters()],
                             [masters[n].to(p.device, p.dtype) for n, p in ema.named_parameters()], 1.0 - decay)
        for eb, mb in zip(ema.buffers(), engine.module.buffers()):
            eb.copy_(mb)


class Weights:
    """A consolidated state dict that save_checkpoint can store like a module's."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def consolidated(engine) -> Weights:
    """Full fp32 weights plus buffers, keyed like the plain model; collective."""
    tensors = {n: t.float().cpu() for n, t in full_params(engine).items()}
    for name, buf in engine.module.named_buffers():
        tensors[name] = buf.detach().cpu()
    order = list(engine.module.state_dict().keys())  # ZeRO-3 placeholders still list every key
    return Weights({k: tensors[k] for k in order if k in tensors})


def staging_dir(out: Path, step: int) -> Path:
    return Path(out) / "ckpt" / f".step_{step:08d}.deepspeed"


def save_engine(engine, out: Path, step: int, info: DistInfo) -> Path:
    """Every rank writes its shard of DeepSpeed's state to a staging folder; collective."""
    stage = staging_dir(out, step)
    if info.main:
        shutil.rmtree(stage, ignore_errors=True)
    barrier()
    with naming_a_full_disk(stage):  # torch.save under DeepSpeed loses the errno of a full disk
        try:
            engine.save_checkpoint(str(stage), tag=DS_TAG, save_latest=False)
        except BaseException:
            if info.main:  # the run stops here: give a full disk its space back
                shutil.rmtree(stage, ignore_errors=True)
            raise
    barrier()
    return stage


def adopt(stage: Path, ckpt: Path) -> None:
    """Move the staged DeepSpeed state into the checkpoint folder (before its atomic rename)."""
    target = ckpt / "deepspeed"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(stage, target)


def load_engine(engine, ckpt: Path) -> None:
    """Restore DeepSpeed's module, optimizer and scheduler state from ``ckpt/deepspeed``."""
    folder = Path(ckpt) / "deepspeed"
    stage = staging_dir(Path(ckpt).parent.parent, int(Path(ckpt).name.split("_")[-1]))
    if not folder.is_dir() and stage.is_dir():
        folder = stage  # killed between the rename and the adoption: the staged state is complete
    if not folder.is_dir():
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed state (deepspeed/): it was written without "
                                "--deepspeed; resume it without --deepspeed or start a new --out")
    path, _ = engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {folder}; is the checkpoint complete?")
