"""benchmarks/runbook.py: time boxes that lose nothing, and the whole smoke run (tiny sizes, CPU)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SPEC = importlib.util.spec_from_file_location("runbook", ROOT / "benchmarks" / "runbook.py")
runbook = importlib.util.module_from_spec(SPEC)
sys.modules["runbook"] = runbook  # dataclasses look their module up while the class is built
SPEC.loader.exec_module(runbook)

ENV = {"date": "2026-11-29T20:00:00+00:00", "mode": "test", "gpu": None, "driver": None, "cuda": None,
       "torch": "x", "triton": "y", "python": "3", "commit": None, "roofline_gpu": None}


def _run(tmp_path, budget=60.0) -> "runbook.Run":
    work = tmp_path / "work"
    work.mkdir()
    return runbook.Run(tmp_path, work, smoke=False, deadline=time.monotonic() + budget, env=dict(ENV))


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_step_past_its_box_is_killed_and_keeps_its_streamed_rows(tmp_path):
    r = _run(tmp_path)
    stream = tmp_path / "s.jsonl"
    # a child that streams one row and a half, then hangs in a grandchild of its own process group
    code = (f"import json, subprocess, sys; open({str(stream)!r}, 'a').write(json.dumps({{'kind': 'row', 'x': 1}}) + "
            "'\\n' + '{\"kind\": \"ro');"  # and half of the next line, cut by the kill
            "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])")
    t0 = time.monotonic()
    exit_code, _ = r.call(_python(code), timeout=3)
    assert exit_code is None and time.monotonic() - t0 < 20  # the whole group went, not only the child
    assert runbook.read_stream(stream) == ([{"kind": "row", "x": 1}], [])
    assert "killed at time limit" in (tmp_path / "runbook.log").read_text()


def test_steps_run_in_order_each_written_before_the_next(tmp_path):
    r, seen = _run(tmp_path, budget=30), []

    def slow(run, timeout):
        seen.append(timeout)
        return {"status": "timeout" if run.call(_python("import time; time.sleep(30)"), 1)[0] is None else "ok"}

    def broken(run, timeout):
        raise RuntimeError("no data")

    def check_written(run, timeout):  # the earlier steps are on disk already
        seen.append([s["name"] for s in json.loads((tmp_path / "runbook.json").read_text())["steps"]])
        return {"status": "ok"}

    runbook.run_steps(r, [runbook.Step("a", "hangs", 2, slow, 1), runbook.Step("b", "raises", 5, broken, 1),
                          runbook.Step("c", "checks", 5, check_written, 1),
                          runbook.Step("d", "wants more", 1e9, slow, 1e6)])
    assert seen == [2, ["a", "b"]]
    assert [(s["name"], s["status"]) for s in r.steps] == [("a", "timeout"), ("b", "error"), ("c", "ok"), ("d", "skipped")]
    assert r.steps[1]["reason"] == "RuntimeError: no data"
    md = (tmp_path / "runbook.md").read_text()
    assert "| b | raises | error RuntimeError: no data |" in md and "| d | wants more | skipped" in md


def test_last_json_reads_the_training_bench_result():
    assert runbook.last_json('log line\n{\n "img_per_s": 12.5,\n "compile": false\n}\n') == \
        {"img_per_s": 12.5, "compile": False}
    assert runbook.last_json("Traceback ...\nRuntimeError: CUDA out of memory") is None


def test_compare_is_sized_to_the_time_left(tmp_path):
    r = _run(tmp_path)
    r.data = str(tmp_path / "tiny")
    (tmp_path / "tiny" / "train" / "n01").mkdir(parents=True)
    r.steps = [{"train": {"compile": False, "img_per_s": 2400.0}}]
    args = runbook.compare_args(r, timeout=240)
    steps = int(args[args.index("--budget_steps") + 1])
    assert steps == int(240 / 3 / 3 * 2400 / 128) and args[args.index("--data") + 1] == str(tmp_path / "tiny" / "train")
    assert "fits only" in runbook.compare_args(r, timeout=20)
    r.data = str(tmp_path / "absent.tar.gz")
    assert "carry .data" in runbook.compare_args(r, timeout=240)


@pytest.mark.timeout(400)
def test_smoke_run_end_to_end(tmp_path):
    """The runbook as a GPU session runs it, at tiny sizes: every step passes and all four outputs
    hold what the README table is made from."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/runbook.py", "--out", str(tmp_path), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runbook.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"correctness": "ok", "kernels": "ok", "sag_step": "ok", "train: eager": "ok",
                      "train: compiled": "skipped", "compare": "ok"}
    correctness = summary["steps"][0]["outcomes"]
    assert len(correctness) == 4 and all(o["outcome"] == "passed" for o in correctness)
    rows = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    families = {row["name"].split("[")[0] for row in rows}
    assert families == {"test_attention_key_mass", "test_sag_degrade", "test_lloyd_iteration", "test_sinkhorn",
                        "test_sag_cfg_step", "test_dit_key_mass", "test_dit_guider_step"}
    assert all(row["extra_info"]["flops"] > 0 and row["extra_info"]["bytes"] > 0 for row in rows)
    md = (tmp_path / "runbook.md").read_text()
    assert md.startswith("# GPU runbook: no GPU") and "smoke" in md and "| of roofline |" in md
    assert "### training (sgengine.training.bench)" in md and "### Equal-budget comparison on digits" in md
    assert "sgengine.training.bench" in (tmp_path / "runbook.log").read_text()
