"""The training engines: one object per way of running the optimisation, one interface for the trainer.

``PlainEngine`` is one process (AdamW + the warmup LambdaLR); ``DDPEngine`` adds torch DDP under
torchrun (the gradient all-reduce skipped on every micro-step but the last); ``DeepSpeedEngine``
hands model, optimizer and ZeRO sharding to DeepSpeed (ds.py). The trainer calls only:

    with engine.accumulating(micro, accum): loss = loss_fn(engine.forward, ...); engine.backward(loss, accum)
    engine.step(); engine.update_ema(ema, decay)
    engine.weights() / engine.save(out, step) / engine.load(ckpt, state)   # checkpoints

``LossWatch`` keeps the running loss and the first non-finite step on the device, so a step costs no
host synchronisation and no all-reduce; the trainer reads it (one all-reduce) at log points and
before every checkpoint, and every rank reads it at the same step, so all stop together.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint import load_weights
from ..common import ranks
from . import distributed as D, ds  # ds imports no DeepSpeed until a run asks for it
from .ema import ema_update


class CompileOrEager:
    """torch.compile(module) that falls back to eager (warning once) when compiling fails.

    Compilation happens at the first call, so only that call's failure means "cannot compile";
    later errors are real and propagate.
    """

    def __init__(self, module: torch.nn.Module, mode: str = "default"):
        self.module, self.first = module, True
        self.fn = torch.compile(module, mode=mode)

    def __call__(self, *args, **kwargs):
        if not self.first:
            return self.fn(*args, **kwargs)
        self.first = False
        try:
            return self.fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); training eagerly", stacklevel=2)
            self.fn = self.module
            return self.fn(*args, **kwargs)


class PlainEngine:
    """One process: AdamW (fused on CUDA), the warmup LambdaLR, gradient clipping, the module's EMA."""

    def __init__(self, net: torch.nn.Module, cfg, device: torch.device, lr_lambda):
        self.net, self.cfg = net, cfg
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=device.type == "cuda")
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.bf16 = cfg.bf16 and device.type == "cuda"
        self.forward = self.wrap(net, device)
        if cfg.compile:
            self.forward = CompileOrEager(self.forward, cfg.compile_mode)

    def wrap(self, net, device):
        return net

    def add_params(self, params) -> None:
        """Train more parameters with the same optimizer and warmup (the online trainer's head)."""
        self.optimizer.add_param_group({"params": list(params)})
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_scheduler.lr_lambdas[0])

    def accumulating(self, micro: int, accum: int):
        return nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def step(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()

    def update_ema(self, ema: torch.nn.Module, decay: float) -> None:
        ema_update(ema, self.net, decay)

    def weights(self):
        """What the checkpoint stores as model.safetensors (anything with a ``state_dict()``)."""
        return self.net

    def save(self, out: Path, step: int) -> tuple[dict, Path | None]:
        """(state.pt entries, a staged folder to move into the checkpoint or None); every rank calls it."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict()}, None

    def load(self, ckpt: Path, state: dict) -> None:
        self.net.load_state_dict(load_weights(ckpt, "model"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])


class DDPEngine(PlainEngine):
    """torch DDP under torchrun: gradients averaged over ranks during the last micro-step's backward."""

    def __init__(self, net, cfg, device, lr_lambda, find_unused: bool = False):
        self.find_unused = find_unused  # some parameters sit out some steps (a graph traversal per step)
        super().__init__(net, cfg, device, lr_lambda)

    def wrap(self, net, device):
        return D.wrap_ddp(net, device, self.find_unused)

    def accumulating(self, micro: int, accum: int):
        ddp = self.forward.module if isinstance(self.forward, CompileOrEager) else self.forward
        return D.accumulating(ddp, micro, accum)


class DeepSpeedEngine:
    """DeepSpeed (ZeRO 0-3): it scales the loss by 1/accum and steps at the accumulation boundary
    itself, clips, and shards the optimizer state; the EMA is updated from gathered fp32 masters."""

    def __init__(self, net, cfg, device, lr_lambda, info):
        if cfg.compile:  # ZeRO's parameter hooks do not survive tracing reliably
            warnings.warn("--compile is ignored under --deepspeed; training eagerly", stacklevel=3)
        self.net, self.info = net, info
        self.engine = ds.initialize(net, cfg, device, lr_lambda)
        self.forward = self.engine
        self.optimizer, self.lr_scheduler = self.engine.optimizer, self.engine.lr_scheduler
        self.bf16 = self.engine.bfloat16_enabled()  # bf16 weights need bf16 inputs, on any device

    def add_params(self, params) -> None:
        raise ValueError("extra trained parameters live outside the DeepSpeed engine: drop --deepspeed")

    def accumulating(self, micro: int, accum: int):
        return nullcontext()

    def zero_grad(self) -> None:
        """DeepSpeed zeroes the gradients after its own step."""

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> None:
        """Done in ``backward`` at the accumulation boundary."""

    def update_ema(self, ema: torch.nn.Module, decay: float) -> None:
        ds.update_ema(ema, self.engine, decay)

    def weights(self):
        return ds.consolidated(self.engine)  # collective: full fp32 weights on every rank

    def save(self, out: Path, step: int) -> tuple[dict, Path | None]:
        return {}, ds.save_engine(self.engine, out, step, self.info)

    def load(self, ckpt: Path, state: dict) -> None:
        ds.load_engine(self.engine, ckpt)  # module, optimizer and scheduler, sharded per rank


def make_engine(net, cfg, device, info, lr_lambda, find_unused: bool = False):
    """The engine for ``cfg`` and the launch: DeepSpeed, DDP under torchrun, or plain."""
    if cfg.deepspeed:
        return DeepSpeedEngine(net, cfg, device, lr_lambda, info)
    if info.world > 1:
        return DDPEngine(net, cfg, device, lr_lambda, find_unused)
    return PlainEngine(net, cfg, device, lr_lambda)


class LossWatch:
    """The loss of the steps since the last read and the first non-finite one, kept on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.first_bad = torch.full((), float("inf"), device=device)  # the step (1-based); inf: none
        self.bad_value = torch.zeros((), device=device)

    def reset(self) -> None:
        self.total, self.n = torch.zeros((), dtype=torch.float64, device=self.device), 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        """No host synchronisation: everything stays on the device."""
        loss = loss.detach().float()
        self.total += loss
        self.n += 1
        new = ~torch.isfinite(loss) & torch.isinf(self.first_bad)
        self.first_bad = torch.where(new, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(new, loss, self.bad_value)

    def read(self) -> tuple[float, int | None, float]:
        """(mean loss over the steps and ranks since the last read, the first non-finite step over all
        ranks or None, its loss value); collective: one all-reduce for the sum, one for the step."""
        mean = float(ranks.sum_over_ranks(self.total)) / max(self.n * ranks.world_size(), 1)
        first = float(ranks.min_over_ranks(self.first_bad))
        mine = float(self.first_bad) == first
        return mean, None if first == float("inf") else int(first), float(self.bad_value) if mine else float("nan")
