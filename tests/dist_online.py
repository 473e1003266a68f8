"""Two-rank checks of online self-guidance (run by tests/test_online.py):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_online.py OUT

1. L_SK: each rank passes its own, unequal share of one global batch of features (one rank may
   have no sample inside the window); loss, gradients of phi and M and the BN statistics must
   equal one process's on the concatenated batch.
2. A short OnlineTrainer run across the stage switch under DDP; every rank writes a digest of its
   network, EMA and clustering to OUT/rank<R>.pt, which the test compares across ranks.
Rank 0 prints "dist_online OK" on success.
"""
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sgengine.config import OnlineConfig, apply_overrides, preset
from sgengine.online import OnlineClustering, OnlineTrainer


def _loss_and_grads(cl, f, t, distributed):
    cl.zero_grad()
    loss = cl.loss(f, t, distributed=distributed)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cl.named_parameters()}


def check_loss(splits: list[int], inside: list[bool]) -> None:
    torch.manual_seed(0)
    cl = OnlineClustering(16, OnlineConfig(prototypes=6, head_hidden=32, t_low=0.5, t_high=0.9))
    g = torch.Generator().manual_seed(sum(splits))
    f = torch.randn(sum(splits), 16, generator=g)
    t = torch.where(torch.tensor(inside), torch.full((len(inside),), 0.7), torch.full((len(inside),), 0.1))
    single = copy.deepcopy(cl)
    want, want_g = _loss_and_grads(single, f, t, distributed=False)
    mine = slice(sum(splits[: dist.get_rank()]), sum(splits[: dist.get_rank() + 1]))
    got, got_g = _loss_and_grads(cl, f[mine], t[mine], distributed=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_g.items():
        torch.testing.assert_close(got_g[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, buf in single.named_buffers():
        torch.testing.assert_close(dict(cl.named_buffers())[name], buf, rtol=1e-5, atol=1e-6, msg=name)


def train(out: Path) -> None:
    cfg = apply_overrides(preset("uvit-tiny-online"), {
        "out": str(out / "run"), "device": "cpu", "batch_size": 16, "steps": 6, "log_every": 2, "ckpt_every": 6,
        "sample_steps": 2, "grid_rows": 2, "grid_cols": 2, "online.stage_switch": 0.5})
    tr = OnlineTrainer(cfg)
    tr.run()
    digest = {"net": tr.net.state_dict(), "ema": tr.ema.state_dict(), "clustering": tr.clustering.state_dict(),
              "usage": tr.usage, "step": tr.step}
    torch.save(digest, out / f"rank{dist.get_rank()}.pt")


def main(out: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    check_loss([5, 7], [True] * 12)
    check_loss([6, 4], [True, False, True, True, False, True, False, True, True, True])
    check_loss([5, 3], [True] * 5 + [False] * 3)  # rank 1: nothing inside the window
    train(out)  # the trainer keeps the process group: torchrun's environment is already set
    if dist.get_rank() == 0:
        print("dist_online OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
