"""Two ranks under torchrun through the train CLI, exactly as the README starts them (issue 13): the
default self-labels from an empty --out (rank 0 clusters before the process group exists; this
used to deadlock), and --eval_every under DeepSpeed (promoting a best checkpoint with its
deepspeed/ folder used to crash)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from sgtest import torchrun

from sgengine.annotate.io import Annotations, load_annotations
from sgengine.config import preset
from sgengine.data import load_digits
from sgengine.train import self_labels

try:
    import deepspeed  # noqa: F401
    HAVE_DS = True
except Exception:  # noqa: BLE001 - any import failure means the DeepSpeed tests cannot run
    HAVE_DS = False
needs_ds = pytest.mark.skipif(not HAVE_DS, reason="DeepSpeed is not installed: pip install deepspeed")

TINY = ["--preset", "tiny", "--steps", "4", "--batch_size", "8", "--log_every", "2", "--ckpt_every", "2",
        "--sample_steps", "2", "--grid_rows", "2", "--grid_cols", "1"]


@pytest.fixture(scope="module")
def one_process_labels(tmp_path_factory) -> Annotations:
    """The annotation file one process makes for the tiny preset (k-means on PCA-8 of the digits)."""
    out = tmp_path_factory.mktemp("single") / "run"
    return load_annotations(self_labels(dataclasses.replace(preset("tiny"), out=str(out)), log=lambda *a: None))


@pytest.fixture(scope="module")
def eval_flags(tmp_path_factory) -> list[str]:
    """A few-iteration substitute classifier and a reference set: enough for a Frechet distance."""
    from sgengine.eval.classifier import train_classifier

    d = tmp_path_factory.mktemp("eval")
    clf = train_classifier(load_digits(8), 8, 1, d / "clf.pt", channels=1, width=8, batch_size=32,
                           max_iters=5, progress=False)
    np.savez(d / "ref.npz", x=load_digits(8).images.numpy()[:200])
    return ["--eval_every", "2", "--eval_n", "16", "--eval_ref", str(d / "ref.npz"),
            "--eval_features", f"classifier:{clf}"]


def _assert_finished_with_the_labels_of_one_process(out, proc, labels: Annotations):
    got = load_annotations(out / "annotations.safetensors")  # safetensors orders its metadata freely: compare content
    assert torch.equal(got.ids, labels.ids) and (got.k, got.settings) == (labels.k, labels.settings)
    assert (out / "ckpt" / "step_00000004" / "meta.json").is_file() and "done: 4 steps" in proc.stdout


@pytest.mark.distributed
def test_ddp_two_ranks_self_label_from_an_empty_out(tmp_path, one_process_labels):
    out = tmp_path / "run"
    proc = torchrun("dist_cli.py", *TINY, "--out", out)
    _assert_finished_with_the_labels_of_one_process(out, proc, one_process_labels)


@pytest.mark.distributed
@needs_ds
def test_zero2_two_ranks_self_label_and_keep_the_best_evaluated_checkpoint(tmp_path, one_process_labels,
                                                                         eval_flags):
    out = tmp_path / "run"
    proc = torchrun("dist_cli.py", *TINY, "--out", out, "--deepspeed", "true", "--zero_stage", "2", *eval_flags)
    _assert_finished_with_the_labels_of_one_process(out, proc, one_process_labels)
    best = out / "ckpt" / "best"
    assert (best / "deepspeed").is_dir() and (best / "ema.safetensors").is_file()
    assert json.loads((out / "ckpt" / "best.json").read_text())["checkpoint"].startswith(str(out / "ckpt" / "step_"))
    assert len((out / "eval.jsonl").read_text().splitlines()) == 2
