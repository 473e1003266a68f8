"""Two-rank check of the distributed Sinkhorn (run by tests/test_sinkhorn.py):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_sinkhorn.py

Each rank passes its own slice of one global batch (gloo, CPU); the gathered codes must equal the
single-process codes of the concatenated batch, and differ from codes balanced per rank only.
Exits non-zero on any mismatch; rank 0 prints "dist_sinkhorn OK" on success.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton on CPU tensors

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sgengine.kernels.sinkhorn import sinkhorn  # noqa: E402


def gathered(local: torch.Tensor) -> torch.Tensor:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return torch.cat(parts)


def check(splits: list[int], K: int, backend: str, eps: float) -> None:
    rank = dist.get_rank()
    full = torch.rand(sum(splits), K, generator=torch.Generator().manual_seed(K)) * 2 - 1
    local = full.split(splits)[rank]
    q = gathered(sinkhorn(local, eps=eps, backend=backend))
    single = sinkhorn(full, eps=eps, backend="torch", distributed=False)
    # fp32 rounding of S = s / eps is ~|S| * 2^-24 relative: 1e-5 at eps=0.05, 1e-4 at eps=0.01.
    torch.testing.assert_close(q, single, rtol=5e-7 / eps, atol=1e-30)
    per_rank = gathered(sinkhorn(local, eps=eps, backend="torch", distributed=False))
    assert (per_rank - single).abs().max() > 1e-3, "ranks were not balanced jointly"


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for backend in ("torch", "triton"):
        check([8, 8], 217, backend, 0.05)  # equal per-rank batches, as SwAV assumes
        check([5, 12], 130, backend, 0.05)  # unequal batches
        check([16, 16], 300, backend, 0.01)
    if dist.get_rank() == 0:
        print("dist_sinkhorn OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
