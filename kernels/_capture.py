"""Launch capture for the compile audit: what each public entry point would launch on a GPU.

No GPU and no CUDA driver are needed. The entry points run under ``FakeTensorMode`` on CUDA
tensors that have a device but no storage; the engine's custom ops (namespace ``sgengine``) run
their real, launching implementation on them instead of their fake one; and triton's
``JITFunction.run`` and ``Autotuner.run`` are swapped for recorders, so ``kernel[grid](...)``
records the kernel, its arguments, its constexprs and options, and its grid, and runs nothing.
An autotuned launch is recorded once per config of its list (every config it can choose).
Because the launchers themselves produce the records, a new kernel or config is captured
without anyone listing it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from typing import Any, Callable
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

OP_NAMESPACE = "sgengine"


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument as triton specialises it: dtype, and whether its address is 16-byte
    aligned (torch allocations are; a view with an odd storage offset may not be)."""
    dtype: torch.dtype
    aligned: bool

    def data_ptr(self) -> int:
        return 0 if self.aligned else 2


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call; ``tuned`` = (autotune call id, configs)."""
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: Any
    tuned: tuple[int, int] | None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def programs(self) -> int:
        """Programs in the launch grid (the grid callable sees the bound arguments, as triton's)."""
        grid = self.grid
        if callable(grid):
            params = {k: v for k, v in self.kwargs.items() if k in self.kernel.signature.parameters}
            bound = self.kernel.signature.bind(*self.args, **params)
            bound.apply_defaults()
            grid = grid(dict(bound.arguments))
        return math.prod(int(g) for g in grid)


def _plain(value):
    """Fake tensors -> TensorArg (they have no data pointer); everything else as it is."""
    if isinstance(value, torch.Tensor):
        offset = value.storage_offset() * value.element_size()
        return TensorArg(value.dtype, offset % 16 == 0)
    return value


_TRUTH = (torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
          torch.ops.aten._local_scalar_dense.default)


class _RealCustomOps(TorchDispatchMode):
    """Runs the engine's custom ops' own implementation (which launches the kernels) on fake
    tensors. A mode is off inside its own handler, so truth checks get a mode of their own."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) != OP_NAMESPACE:
            return func(*args, **(kwargs or {}))
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        with _FakeTruth():
            return func.redispatch(keys, *args, **(kwargs or {}))


class _FakeTruth(TorchDispatchMode):
    """Host-side checks on fake data pass: ``bool(torch.isfinite(x).all())`` is True."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _TRUTH and args[0].dtype == torch.bool:
            return True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _recording(launches: list):
    """Swap triton's launch entry points for recorders that append to ``launches``."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    tuned = {"call": None}
    calls = itertools.count()

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(self, tuple(map(_plain, args)),
                               {k: _plain(v) for k, v in kwargs.items()}, grid, tuned["call"]))

    def autotune(self, *args, **kwargs):
        grid, call = kwargs.pop("grid"), next(calls)
        kwargs.pop("warmup", None)
        for config in self.configs:
            tuned["call"] = (call, len(self.configs))
            self.fn.run(*args, grid=grid, warmup=False, **{**kwargs, **config.all_kwargs()})
        tuned["call"] = None

    with mock.patch.object(JITFunction, "run", record), mock.patch.object(Autotuner, "run", autotune):
        yield


def capture(call: Callable[[], Any]) -> list[Launch]:
    """The launches that ``call()`` makes; inside it, CUDA tensors are fake (no GPU needed)."""
    launches: list[Launch] = []
    with _recording(launches), FakeTensorMode(), _RealCustomOps(), warnings.catch_warnings():
        # A launcher's alignment check (x.data_ptr() % 16) reads 0 from a fake tensor: aligned.
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        call()
    return launches


def fake_cuda(shape, dtype) -> torch.Tensor:
    """A stand-in input for ``capture``: a CUDA tensor of this shape with no storage."""
    return torch.empty(shape, dtype=dtype, device="cuda")
