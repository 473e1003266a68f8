"""Scale-out: DeepSpeed ZeRO and torch DDP against the plain single-process trainer.

Two ranks with ``batch_size=b`` and one process with ``batch_size=b, grad_accum=2`` train
on the same global batch, images and noise (sgengine/training/distributed.py), so their
losses and EMA weights must agree up to floating-point reduction order.
"""
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from sgtest import torchrun

from sgengine.config import preset
from sgengine.sampling import load_generator, sample
from sgengine.training import distributed as D
from sgengine.checkpoint import load_weights
from sgengine.training.engines import CompileOrEager
from sgengine.training.trainer import Trainer
from sgengine.viz import read_jsonl

STEPS, B = 4, 8
try:
    import deepspeed  # noqa: F401
    HAVE_DS = True
except Exception:  # noqa: BLE001 - any import failure means the DeepSpeed tests cannot run
    HAVE_DS = False
needs_ds = pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed: pip install deepspeed")
# fp32 reduction order differs (all-reduce vs accumulation); Adam turns that into ~1e-5 weight noise.
RTOL_LOSS, ATOL_W = 1e-4, 1e-4


def _cfg(out, **kw):
    base = dict(out=str(out), condition="labels", steps=STEPS, batch_size=B, log_every=1, ckpt_every=2,
                sample_steps=2, grid_rows=2, grid_cols=1)
    return dataclasses.replace(preset("tiny"), **{**base, **kw})


def _losses(run):
    return [r["loss"] for r in read_jsonl(Path(run) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain loop on the same global batch: one process, two accumulated micro-batches."""
    out = tmp_path_factory.mktemp("ref") / "run"
    tr = Trainer(_cfg(out, grad_accum=2))
    tr.run()
    return {"losses": _losses(out), "ema": {k: v.clone() for k, v in tr.ema.state_dict().items()}}


def _torchrun(out, *flags, timeout=240):
    args = ["--preset", "tiny", "--condition", "labels", "--out", str(out), "--steps", str(STEPS),
            "--batch_size", str(B), "--log_every", "1", "--ckpt_every", "2", "--sample_steps", "2",
            "--grid_rows", "2", "--grid_cols", "1", *flags]
    torchrun("dist_train.py", *args, timeout=timeout)
    return out


def _assert_same_run(out, reference, check_ema=True):
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(reference["losses"]), rtol=RTOL_LOSS, atol=0)
    if check_ema:
        got = load_weights(Path(out) / "ckpt" / f"step_{STEPS:08d}", "ema")
        for k, v in reference["ema"].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=ATOL_W)


def _assert_distinct_shards(out):
    r0, r1 = (json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r0["rows"], r1["rows"]) == (2, [0, B], [B, 2 * B])
    assert r0["indices"] != r1["indices"] and r0["seed"] != r1["seed"]
    assert not (Path(out) / "rank1").exists()


# -- fast unit tests -----------------------------------------------------------------------
def test_shards_tile_the_global_batch_and_seeds_differ():
    infos = [D.DistInfo(rank=r, world=2) for r in range(2)]
    rows = [D.shard_slice(4, m, i) for m in range(3) for i in infos]
    assert [(s.start, s.stop) for s in rows] == [(4 * k, 4 * k + 4) for k in range(6)]
    seeds = {D.shard_seed(0, 7, m, i) for m in range(3) for i in infos}
    assert len(seeds) == 6 and D.shard_seed(0, 7, 1, infos[0]) == D.shard_seed(0, 7, 1, infos[0])
    # shard s = micro * world + rank: one rank's micro-step 1 is two ranks' rank 1
    assert D.shard_seed(0, 7, 1, D.DistInfo()) == D.shard_seed(0, 7, 0, infos[1])


def test_generated_deepspeed_config_and_user_override(tmp_path):
    from sgengine.training.ds import ds_config

    cfg = _cfg(tmp_path, zero_stage=2, grad_accum=3, lr=1e-3, weight_decay=0.05, grad_clip=0.5)
    conf = ds_config(cfg, torch.device("cpu"))
    assert conf["train_micro_batch_size_per_gpu"] == B and conf["gradient_accumulation_steps"] == 3
    assert conf["zero_optimization"] == {"stage": 2} and conf["gradient_clipping"] == 0.5
    assert conf["optimizer"]["type"] == "AdamW" and conf["bf16"] == {"enabled": False}
    assert conf["optimizer"]["params"]["lr"] == 1e-3 and conf["optimizer"]["params"]["weight_decay"] == 0.05
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "optimizer": {"params": {"lr": 5e-4}},
                                "flops_profiler": {"enabled": False}}))
    conf = ds_config(dataclasses.replace(cfg, ds_config=str(user)), torch.device("cpu"))
    assert conf["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert conf["optimizer"]["params"]["lr"] == 5e-4 and conf["optimizer"]["params"]["weight_decay"] == 0.05
    assert conf["flops_profiler"] == {"enabled": False}
    with pytest.raises(FileNotFoundError, match="--ds_config"):
        ds_config(dataclasses.replace(cfg, ds_config=str(tmp_path / "nope.json")), torch.device("cpu"))


def test_channels_last_with_deepspeed_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="drop --channels_last"):
        Trainer(_cfg(tmp_path, deepspeed=True, channels_last=True))


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    def broken(module, mode="default"):
        def fn(*a, **k):
            raise RuntimeError("no compiler here")
        return fn
    monkeypatch.setattr(torch, "compile", broken)
    net = torch.nn.Linear(3, 2)
    fwd = CompileOrEager(net)
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="training eagerly"):
        torch.testing.assert_close(fwd(x), net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent and eager
        torch.testing.assert_close(fwd(x), net(x))


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode="default": modes.append(mode) or module)
    Trainer(_cfg(tmp_path / "run", steps=1, compile=True, compile_mode="reduce-overhead")).run()
    assert modes == ["reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        _cfg(tmp_path / "bad", compile_mode="cudagraphs")


def test_bench_reports_throughput_flops_and_mfu():
    from sgengine.training.bench import bench

    res = bench(dataclasses.replace(preset("tiny"), device="cpu"), steps=2, peak=1e12, warmup=1)
    assert res["img_per_s"] > 0 and res["global_batch"] == 16
    assert 1e6 < res["flops_per_img"] < 1e9  # the tiny UNet: ~25 MFLOP per image, forward + backward
    assert res["mfu"] == pytest.approx(res["flops_per_img"] * res["img_per_s"] / 1e12)


def test_channels_last_trains_like_contiguous(tmp_path, reference):
    out = tmp_path / "cl"
    Trainer(_cfg(out, grad_accum=2, channels_last=True)).run()
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(reference["losses"]), rtol=1e-4, atol=0)


# -- DeepSpeed in this process (a group of one) ------------------------------------------------
@needs_ds
def test_zero2_resume_continues_the_run(tmp_path, reference):
    Trainer(_cfg(tmp_path / "z2", grad_accum=2, steps=2, deepspeed=True, zero_stage=2)).run()
    tr = Trainer(_cfg(tmp_path / "z2", grad_accum=2, deepspeed=True, zero_stage=2, resume=True))
    assert tr.step == 2
    tr.run()
    _assert_same_run(tmp_path / "z2", reference)


@needs_ds
def test_deepspeed_bf16_checkpoints_fp32_weights_near_the_fp32_run(tmp_path, reference):
    """bf16 module weights: EMA and model.safetensors come from DeepSpeed's fp32 master copy."""
    user = tmp_path / "bf16.json"
    user.write_text(json.dumps({"bf16": {"enabled": True}}))  # generated configs enable bf16 on CUDA only
    tr = Trainer(_cfg(tmp_path / "bf", grad_accum=2, deepspeed=True, zero_stage=3, ds_config=str(user)))
    assert tr.engine.bf16
    tr.run()
    ckpt = tmp_path / "bf" / "ckpt" / f"step_{STEPS:08d}"
    for which in ("ema", "model"):
        weights = load_weights(ckpt, which)
        assert all(v.dtype == torch.float32 for v in weights.values())
    got = load_weights(ckpt, "ema")
    for k, v in reference["ema"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-2)  # bf16 activations: loose


# -- two ranks under torchrun -----------------------------------------------------------------
@pytest.mark.distributed
def test_ddp_two_ranks_match_single_process(tmp_path, reference):
    out = _torchrun(tmp_path / "ddp")
    _assert_same_run(out, reference)
    _assert_distinct_shards(out)


@pytest.mark.distributed
@needs_ds
def test_zero2_two_ranks_match_single_process(tmp_path, reference):
    out = _torchrun(tmp_path / "z2", "--deepspeed", "true", "--zero_stage", "2")
    _assert_same_run(out, reference)


@pytest.mark.distributed
@needs_ds
def test_zero3_two_ranks_match_and_the_checkpoint_samples(tmp_path, reference):
    out = _torchrun(tmp_path / "z3", "--deepspeed", "true", "--zero_stage", "3")
    _assert_same_run(out, reference)
    assert (out / "ckpt" / f"step_{STEPS:08d}" / "deepspeed").is_dir()
    gen = load_generator(out)
    for k, v in reference["ema"].items():
        torch.testing.assert_close(gen.net.state_dict()[k], v, rtol=0, atol=ATOL_W)
    imgs = sample(gen, torch.tensor([0, 1]), w=2.0, steps=2)
    assert imgs.shape == (2, 1, 8, 8) and torch.isfinite(imgs).all()
