"""Training from a memory-mapped pack: same batches as in memory, background prefetch, float data
as it is, and two simulated nodes (torchrun --nnodes 2) each reading a distinct shard."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgengine.config import preset
from sgengine.data import BatchLoader, ImageData, open_pack
from sgengine.data.pack import pack
from sgengine.training.trainer import Trainer
from sgengine.viz import read_jsonl

STEPS, B = 3, 8


def _images(root: Path, n: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (10 + i % 4, 12), dtype=np.uint8)).save(root / f"c{i % 3}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    pack(_images(root / "src"), root / "pack", 8, channels=1, workers=2, chunk=5, progress=False)
    return root / "pack"


def _cfg(out, data, **kw):
    base = dict(data=str(data), out=str(out), steps=STEPS, batch_size=B, condition="labels", log_every=1,
                ckpt_every=100, sample_steps=2, grid_rows=2, grid_cols=1)
    return dataclasses.replace(preset("tiny"), **{**base, **kw})


def _mapped_from(t: torch.Tensor, file: Path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``file`` (Linux /proc/self/maps)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if line.endswith(str(file.resolve())) and lo <= t.data_ptr() < hi:
            return True
    return False


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run) / "metrics.jsonl")]


def test_training_from_the_map_equals_training_in_memory(packed, tmp_path):
    mapped = Trainer(_cfg(tmp_path / "a", packed))
    assert _mapped_from(mapped.data.images, packed / "data.bin")  # no copy of the set in this process
    mapped.run()
    assert mapped.loader.hits == STEPS - 1 and mapped.loader.misses == 1  # every batch but the first prefetched
    arr = np.ascontiguousarray(open_pack(packed).images.numpy())
    np.savez(tmp_path / "same.npz", x=arr, y=open_pack(packed).labels.numpy())
    Trainer(_cfg(tmp_path / "b", tmp_path / "same.npz")).run()
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_every_micro_batch_but_the_first_is_prefetched(packed, tmp_path):
    tr = Trainer(_cfg(tmp_path / "a", packed, grad_accum=3, steps=2))
    for _ in range(2):
        tr.train_step()
    assert (tr.loader.hits, tr.loader.misses) == (5, 1)


def test_float_data_trains_as_it_is(tmp_path):
    z = (np.random.default_rng(1).standard_normal((20, 1, 8, 8)) * 4).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    logs = []
    tr = Trainer(_cfg(tmp_path / "run", tmp_path / "z.npy", condition="none"), log=logs.append)
    idx = torch.tensor([3, 0, 19])
    assert torch.equal(tr._images(idx), torch.from_numpy(z)[idx])  # lossless: no clip to [-1, 1], no uint8
    assert any("float data (float32), used as it is" in line for line in logs)


def test_loader_never_serves_a_wrong_prediction():
    imgs = torch.arange(5 * 2 * 3 * 3, dtype=torch.uint8).view(5, 3, 3, 2).permute(0, 3, 1, 2)  # an NHWC-backed view
    loader = BatchLoader(ImageData(imgs), torch.device("cpu"))
    loader.prefetch([torch.tensor([0, 1])])
    want = imgs[torch.tensor([4, 2])].float() / 127.5 - 1
    assert torch.equal(loader.get(torch.tensor([4, 2])), want) and loader.misses == 1
    assert torch.equal(loader.get(torch.tensor([0, 1])), imgs[:2].float() / 127.5 - 1) and loader.hits == 1
    loader.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_read_distinct_shards_and_write_once(packed, tmp_path):
    """Two nodes of one rank each (torchrun --nnodes 2 --node_rank 0|1, one rendezvous endpoint)."""
    here, port, out = Path(__file__).parent, _free_port(), tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(packed), "--condition", "labels", "--out", str(out), "--steps",
            str(STEPS), "--batch_size", str(B), "--log_every", "1", "--ckpt_every", "2", "--sample_steps", "2",
            "--grid_rows", "2", "--grid_cols", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--rdzv-endpoint", f"localhost:{port}",
                               str(here / "dist_train.py"), *args], cwd=here.parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and (r0["rows"], r1["rows"]) == ([0, B], [B, 2 * B])
    assert r0["indices"] != r1["indices"] and r0["seed"] != r1["seed"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, STEPS + 1))  # one writer
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_00000002", f"step_{STEPS:08d}"]


def _nan():
    z = np.zeros((4, 1, 8, 8), np.float32)
    z[1, 0, 2, 3] = np.nan
    return z


@pytest.mark.parametrize("array, message", [
    (_nan(), r"holds 1 NaN/Inf value\(s\), the first at index \(1, 0, 2, 3\)"),
    (np.zeros((4, 24, 16), np.uint8), "non-square 24x16 images but the model takes 8x8"),
    (np.zeros((0, 8, 8), np.uint8), "holds no images"),
])
def test_train_cli_refuses_bad_arrays_in_one_line(tmp_path, capsys, array, message):
    from sgengine.train import main

    np.save(tmp_path / "a.npy", array)
    rc = main(["--preset", "tiny", "--data", str(tmp_path / "a.npy"), "--out", str(tmp_path / "run"),
               "--condition", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err)
    assert not (tmp_path / "run" / "ckpt").exists()


def _posterior(mean: torch.Tensor, std: torch.Tensor) -> ImageData:
    """ImageData as open_pack gives for a posterior pack: NCHW views of NHWC fp16 rows (mean, std)."""
    rows = torch.cat([mean, std], 1).half().permute(0, 2, 3, 1).contiguous()
    moments = rows.permute(0, 3, 1, 2)
    return ImageData(moments[:, :mean.shape[1]], moments=moments)


def test_loader_draws_the_posterior_with_the_right_moments():
    mean = torch.tensor([-1.5, 0.25, 3.0, 0.0]).view(1, 2, 2, 1).expand(2, 2, 2, 2) + torch.arange(2.0).view(2, 1, 1, 1)
    std = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 2, 2, 2).contiguous()
    data, n = _posterior(mean, std), 4000
    loader = BatchLoader(data, torch.device("cpu"))
    idx = torch.arange(2).repeat_interleave(n)
    loader.prefetch([idx])  # gathers all 4 stored channels; the draw comes after the copy
    z = loader.get(idx, torch.Generator().manual_seed(0)).view(2, n, 2, 2, 2)
    assert loader.hits == 1 and z.dtype == torch.float32
    m, s = mean.half().float(), std.half().float()
    # 6 standard errors (fixed seed: deterministic; a 6-sigma miss would be a real bias)
    assert ((z.mean(1) - m).abs() <= 6 * s / n ** 0.5 + 1e-6).all()
    assert ((z.std(1) - s).abs() <= 6 * s / (2 * n) ** 0.5 + 1e-6).all()
    assert torch.equal(z[:, :, :, 0, 0], m[:, None, :, 0, 0].expand(2, n, 2))  # std 0: exactly the mean
    again = loader.get(idx, torch.Generator().manual_seed(0)).view(2, n, 2, 2, 2)
    assert torch.equal(again, z) and loader.misses == 1  # same generator state, same draw
    with pytest.raises(ValueError, match="pass BatchLoader.get a generator"):
        loader.get(idx)
    assert torch.equal(data.batch(torch.tensor([1]), "cpu"), m[1:])  # no generator: the mean (features)
    loader.close()


def test_zero_std_draws_are_the_mean():
    mean = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    loader = BatchLoader(_posterior(mean, torch.zeros_like(mean)), torch.device("cpu"))
    assert torch.equal(loader.get(torch.tensor([2, 0]), torch.Generator().manual_seed(3)), mean.half().float()[[2, 0]])
    loader.close()
