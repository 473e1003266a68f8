"""Batches from (memory-mapped) ImageData, gathered in the background into pinned memory.

The trainer knows the next step's indices one step ahead (its index generator is peeked, not
advanced), so it hands this rank's upcoming shards to ``prefetch``; a background thread gathers
those rows from the map (torch's gather releases the GIL) into page-locked buffers, and ``get``
copies them to the GPU asynchronously. ``get`` checks that a prefetched batch is the one asked
for (by its indices), else gathers synchronously: the prediction can only save time, never
change a batch. Data already on the device (the uint8-on-GPU path for sets that fit) is
indexed there directly. A posterior latent pack's rows travel as stored (mean and std, float16)
and the draw z = mean + std * eps happens on the device, with the caller's generator.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .images import ImageData


class BatchLoader:
    def __init__(self, data: ImageData, device: torch.device):
        self.data, self.device = data, torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sgengine-prefetch")
        self.pending: dict[bytes, Future] = {}
        self.window = 8  # predictions kept: twice the latest prefetch (all micro-shards of a step)
        self.hits = self.misses = 0

    def _rows(self) -> tuple[torch.Tensor, bool]:
        """The tensor to gather from and whether it is an NCHW view of NHWC rows (a pack)."""
        imgs = self.data.stored()
        nhwc = imgs.permute(0, 2, 3, 1)
        return (nhwc, True) if not imgs.is_contiguous() and nhwc.is_contiguous() else (imgs, False)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Host rows of ``idx`` (pinned when the device is CUDA), in the stored layout."""
        src, _ = self._rows()
        pin = self.device.type == "cuda"
        buf = torch.empty((len(idx), *src.shape[1:]), dtype=src.dtype, pin_memory=pin)
        return torch.index_select(src, 0, idx.cpu(), out=buf)

    def prefetch(self, shards: list[torch.Tensor]) -> None:
        """Start gathering these index sets in the background (host data only)."""
        if self.data.stored().device.type != "cpu":
            return
        self.window = max(8, 2 * len(shards))
        for idx in shards:
            key = idx.cpu().numpy().tobytes()
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self.gather, idx.cpu())

    def get(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Floats (N, C, H, W) on the device: uint8 scaled to [-1, 1], float data as it is, a
        posterior pack's z = mean + std * eps with eps from ``generator`` (a generator on the device)."""
        if self.data.moments is not None and generator is None:
            raise ValueError("a posterior latent pack draws z = mean + std * eps per batch: pass "
                             "BatchLoader.get a generator on the training device")
        imgs = self.data.stored()
        if imgs.device.type != "cpu":  # the whole set sits on the GPU
            return self.data.floats(imgs[idx.to(imgs.device)], generator)
        fut = self.pending.pop(idx.cpu().numpy().tobytes(), None)
        self.hits, self.misses = self.hits + (fut is not None), self.misses + (fut is None)
        rows = fut.result() if fut is not None else self.gather(idx)
        x = rows.to(self.device, non_blocking=True)
        if self._rows()[1]:
            x = x.permute(0, 3, 1, 2).contiguous()
        self._drop_stale()
        return self.data.floats(x, generator)  # the draw after the copy: eps is made on the device

    def _drop_stale(self) -> None:
        """Forget predictions never asked for (e.g. a subclass drew more indices): bounded memory."""
        while len(self.pending) > self.window:
            self.pending.pop(next(iter(self.pending))).cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
