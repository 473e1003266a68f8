"""The compile audit on CPU (issue 11): every Triton kernel, as its launcher really launches it
(every autotune config, every fixed launch, every accepted dtype), compiled for sm_80, sm_86,
sm_89 and sm_90 with no GPU. No selectable config may spill or touch local memory or exceed the
target's shared memory, 16-bit matmul kernels must use the tensor cores (wgmma on sm_90 for
the attention forward and the k-means assignment), and every launch at a batch <= 4 must fill one
wave of SMs on the A5000, A100 and H100.

One audit run (``python -m sgengine.kernels.audit``, compiles in parallel) serves every test; it
runs in a subprocess because tests/conftest.py turns the Triton interpreter on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# SGENGINE_AUDIT_TARGETS=90: CI's run at the triton floor audits the H200's target only.
CCS = os.environ.get("SGENGINE_AUDIT_TARGETS", "80,86,89,90")
TARGETS = tuple(f"sm_{cc}" for cc in CCS.split(","))
SIXTEEN_BIT = ("bfloat16", "float16")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(1500)  # the shared audit runs in the first test's setup


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sgengine.kernels.audit", "--targets", CCS,
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _show(rows, *fields):
    return "\n".join(" ".join(f"{f}={r[f]}" for f in ("kernel", "target", "dtype", "config", *fields))
                     for r in rows)


def test_every_kernel_compiles_for_every_target(audit):
    rows = audit["rows"]
    assert rows, "the audit captured no launch"
    errors = [r for r in rows if r["error"]]
    assert not errors, _show(errors, "error")
    for kernel in {r["kernel"] for r in rows}:
        assert {r["target"] for r in rows if r["kernel"] == kernel} == set(TARGETS), kernel
    assert not audit["unlaunched"], f"kernels no audit case reaches: {audit['unlaunched']}"
    assert {r["op"] for r in rows} == {"attention_with_key_mass", "kmeans_assign", "sag_degrade",
                                      "sinkhorn"}


def test_no_selectable_config_spills(audit):
    bad = [r for r in audit["rows"] if r["selectable"] and (r["spill_bytes"] or r["local_ldst"])]
    assert not bad, "spilling configs:\n" + _show(bad, "registers", "spill_bytes", "local_ldst")


def test_shared_memory_fits(audit):
    rows = [r for r in audit["rows"] if not r["error"]]
    over = [r for r in rows if r["selectable"] and r["shared_bytes"] > r["shared_limit"]]
    assert not over, _show(over, "shared_bytes", "shared_limit")
    tuned = {(r["op"], r["kernel"], r["target"], r["dtype"]) for r in rows if r["tuned"]}
    for key in tuned:  # the autotuner must have at least one config it can run on that GPU
        assert any(r["selectable"] for r in rows
                   if r["tuned"] and (r["op"], r["kernel"], r["target"], r["dtype"]) == key), key


def test_tensor_cores(audit):
    matmuls = [r for r in audit["rows"]
               if r["selectable"] and r["dots"] and r["dtype"] in SIXTEEN_BIT]
    assert {r["op"] for r in matmuls} >= {"attention_with_key_mass", "kmeans_assign"}
    no_mma = [r for r in matmuls if r["mma"] == "none"]
    assert not no_mma, "16-bit tl.dot without tensor cores:\n" + _show(no_mma, "mma")
    if "sm_90" not in TARGETS:
        return
    wgmma = [r for r in matmuls if r["target"] == "sm_90" and (
        r["op"] == "kmeans_assign" or (r["op"] == "attention_with_key_mass" and "fwd" in r["kernel"]))]
    assert {r["op"] for r in wgmma} == {"attention_with_key_mass", "kmeans_assign"}
    no_wgmma = [r for r in wgmma if r["mma"] != "HGMMA"]
    assert not no_wgmma, "sm_90 without wgmma:\n" + _show(no_wgmma, "mma")


def test_small_batch_launches_fill_one_wave(audit):
    # Issue 11: at sampling batches (<= 4) every launch fills at least one wave of SMs on the
    # A5000, A100 and H100 (the attention forward splits its keys; the key mass its queries).
    small = [o for o in audit["occupancy"] if o["batch"] <= 4]
    assert {o["op"] for o in small} >= {"attention_with_key_mass", "sag_degrade"}
    under = [o for o in small if o["under_one_wave"]]
    assert not under, "\n".join(f"{o['op']} {o['shape']} {o['kernel']} {o['dtype']}: "
                                f"{o['programs_min']} programs" for o in under)
