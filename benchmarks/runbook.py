"""The GPU runbook: one command that measures what matters first and keeps whatever it measured.

    python benchmarks/runbook.py --out DIR [--budget 450] [--data PATH] [--smoke]

Steps, in priority order, each a subprocess with its own time box inside one overall budget
(a step that overruns is killed with its process group; the next one still runs):

1. correctness: every kernel at the benchmarks' GPU sizes under the error-budget rule
   (the ``sgengine`` rows of bench_sag / bench_sinkhorn / bench_kmeans, untimed);
2. kernels: every kernel against its baselines at SPEC section 5's sizes (the same files, timed),
   and SAG's key mass at SD3-medium's joint attention against the materialised map (bench_dit.py);
3. sag_step: the SAG+CFG sampling step against the CFG step (bench_sag_step.py);
4. train: training img/s of in32 at batch 128, eager and compiled (``sgengine.training.bench``);
5. compare: if time is left, ``sgengine.experiment compare`` on Tiny ImageNet at 32x32 with a step
   budget sized to the time that is left.

After every step DIR holds runbook.json (environment, each step's status, rows, test outcomes
and log tail), runbook.md (the same as tables), bench.json (the timed rows in pytest-benchmark's
format: ``python benchmarks/report.py DIR/bench.json``) and runbook.log (every command's output).
Benchmark rows and test outcomes stream to disk as they finish (``SG_BENCH_STREAM``), so a step
killed at its limit keeps the rows it had. Without a GPU (or with --smoke) every step runs at
tiny sizes with the Triton kernels under the interpreter: the same code path, nothing measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402 - a sibling script, not a package
import roofline  # noqa: E402

from sgengine.common.io import atomic_write  # noqa: E402

DATA_NAME = "tiny-imagenet-dev-32.tar.gz"
LOG_CHARS = 1_000_000  # of each command's output in runbook.log
DATA_PLACES = (ROOT / ".data" / DATA_NAME, ROOT.parent / "shared" / "data" / DATA_NAME)
# pytest-benchmark timing: about half a second a row on a GPU; one round in smoke mode.
TIMING = {False: ["--benchmark-only", "--benchmark-max-time=0.5", "--benchmark-min-rounds=5"],
          True: ["--benchmark-only", "--benchmark-max-time=0", "--benchmark-min-rounds=1"]}


@dataclass
class Run:
    """One runbook invocation: where results go, the clock, and what each step returned."""
    out: Path
    work: Path
    smoke: bool
    deadline: float
    data: str | None = None
    env: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, args: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run ``args`` in the repository root in its own process group; (exit code or None when
        killed at ``timeout``, its output). The output is appended to runbook.log as well."""
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        try:
            output, code = proc.communicate(timeout=max(timeout, 1))[0], proc.returncode
        except subprocess.TimeoutExpired as err:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest, inductor's compile workers, torchrun children
            output, code = _drain(proc, err), None
        with open(self.out / "runbook.log", "a") as fh:  # the tail: progress bars can run to megabytes
            fh.write(f"\n$ {' '.join(args)}\n{output[-LOG_CHARS:]}\n"
                     f"[exit {code if code is not None else 'killed at time limit'}]\n")
        return code, output


def _drain(proc: subprocess.Popen, err: subprocess.TimeoutExpired) -> str:
    """What a killed process printed; a descendant that left the group may hold the pipe open."""
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.stdout.close()
        return err.output if isinstance(err.output, str) else ""


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    box_s: float  # time box on a GPU (smoke mode: the same, it is never reached)
    run: Callable[[Run, float], dict]
    min_s: float = 20.0  # on a GPU, not started with less time than this left


# -- benchmark steps: the benchmark files' own cases, selected with -k -------------------------

def read_stream(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows, test outcomes) streamed by benchmarks/benchlib.py (rows) and conftest.py (outcomes)."""
    if not path.exists():
        return [], []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # the line being written when the step was killed
            continue
    return [e for e in entries if e["kind"] == "row"], [e for e in entries if e["kind"] == "outcome"]


def pytest_step(files: list[str], k_gpu: str | None, timed: bool, k_all: str | None = None):
    """A step that runs benchmark files (selected by ``k_all`` always and ``k_gpu`` on a GPU:
    the smoke sizes have other ids) and collects their streamed rows and outcomes."""
    def run(r: Run, timeout: float) -> dict:
        stream = r.work / f"stream-{time.monotonic_ns()}.jsonl"
        k = " and ".join(f"({e})" for e in (k_all, None if r.smoke else k_gpu) if e)
        args = [sys.executable, "-m", "pytest", *(f"benchmarks/{f}" for f in files), "-q", "-p", "no:cacheprovider",
                *(["-k", k] if k else []), *(TIMING[r.smoke] if timed else ["--benchmark-disable"])]
        env = {"SG_BENCH_STREAM": str(stream), **({"SG_BENCH_SMOKE": "1"} if r.smoke else {})}
        code, output = r.call(args, timeout, env)
        rows, outcomes = read_stream(stream)
        status = "timeout" if code is None else "ok" if code == 0 else "empty" if code == 5 else "failed"
        return {"status": status, "returncode": code, "rows": rows, "outcomes": outcomes, "log_tail": output[-3000:]}
    return run


# -- training throughput ----------------------------------------------------------------------

def last_json(text: str) -> dict | None:
    """The last JSON object printed at the start of a line (sgengine.training.bench's result)."""
    start = text.rfind("\n{") + 1
    if start == 0 and not text.startswith("{"):
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        return None


def train_step(compiled: bool):
    def run(r: Run, timeout: float) -> dict:
        if compiled and r.smoke:
            return {"status": "skipped", "reason": "smoke mode: torch.compile on a CPU builds C++ for minutes"}
        preset, batch, steps = ("tiny", 8, 2) if r.smoke else ("in32", 128, 50)
        args = [sys.executable, "-m", "sgengine.training.bench", "--preset", preset, "--batch_size", str(batch),
                "--steps", str(steps), *(["--compile", "true"] if compiled else [])]
        code, output = r.call(args, timeout)
        result = last_json(output) if code == 0 else None
        if result:
            result.update(train_roofline(preset, result, r.env.get("gpu") or ""))
        status = "timeout" if code is None else "ok" if result else "failed"
        return {"status": status, "returncode": code, "train": result, "log_tail": output[-3000:]}
    return run


def train_roofline(preset: str, result: dict, device_name: str) -> dict:
    """flops, bytes, bound and percentage of one training measurement (roofline.train_step)."""
    from sgengine.config import preset as get_preset
    from sgengine.training.bench import SYNTHETIC_K
    _, params = roofline.unet_flops(get_preset(preset).model, SYNTHETIC_K)
    batch = result["global_batch"]
    work = roofline.train_step(result["flops_per_img"], batch, params)
    return roofline.roofline_info(work, device_name, batch / result["img_per_s"])


# -- the equal-budget comparison on real data ------------------------------------------------------

def find_data(r: Run) -> Path | None:
    """The Tiny ImageNet 32x32 training folder, unpacked into the work folder from --data, from
    .data/ (carried to a GPU machine) or from ../shared/data."""
    spec = Path(r.data) if r.data else next((p for p in DATA_PLACES if p.exists()), None)
    if spec is None or not spec.exists():
        return None
    if spec.is_dir():
        return spec / "train" if (spec / "train").is_dir() else spec
    with tarfile.open(spec) as tar:
        tar.extractall(r.work, filter="data")
    return r.work / spec.name.removesuffix(".tar.gz") / "train"


def compare_args(r: Run, timeout: float) -> list[str] | str:
    """The comparison's command line with a step budget that fits ``timeout``, or why it cannot run."""
    out = str(r.work / "compare")
    if r.smoke:
        return ["--data", "digits", "--preset", "tiny", "--methods", "none,labels", "--budget_steps", "2",
                "--eval_every", "2", "--eval_n", "30", "--clf_epochs", "1", "--clf_max_iters", "10", "--out", out]
    data = find_data(r)
    if data is None:
        return f"no {DATA_NAME}: copy it to .data/ and carry .data (benchmarks/README.md)"
    eager = next((s["train"] for s in r.steps if s.get("train") and not s["train"]["compile"]), None)
    img_s = eager["img_per_s"] if eager else 1500.0
    methods, batch = ("none", "labels", "self-labeled:pca"), 128
    # A third of the time trains (one compile-free run per method); data, classifier and sampling take the rest.
    steps = int(timeout / 3 / len(methods) * img_s / batch)
    if steps < 50:
        return f"{timeout:.0f} s left fits only {steps} training steps a method"
    return ["--data", str(data), "--preset", "in32", "--size", "32", "--methods", ",".join(methods),
            "--budget_steps", str(steps), "--eval_every", str(steps), "--eval_n", "1000", "--clf_epochs", "2",
            "--out", out]


def compare_step(r: Run, timeout: float) -> dict:
    args = compare_args(r, timeout - 5)
    if isinstance(args, str):
        return {"status": "skipped", "reason": args}
    code, output = r.call([sys.executable, "-m", "sgengine.experiment", "compare", *args], timeout - 5)
    results = Path(args[args.index("--out") + 1]) / "results.json"
    summary = json.loads(results.read_text()) if results.exists() else None
    status = "timeout" if code is None else "ok" if summary else "failed"
    return {"status": status, "returncode": code, "compare": summary, "log_tail": output[-3000:]}


KERNELS = ["bench_sag.py", "bench_sinkhorn.py", "bench_kmeans.py"]
# Kernel against baselines, one step per family on a GPU: (name, what, file, -k always, -k on a GPU
# for SPEC section 5's sizes, time box). The smoke run takes them in one pytest process.
FAMILIES = [
    ("attention", "attention + key mass vs SDPA and the materialised map, N = 1k / 4k; B=2 N=256 split "
     "vs one pass", "bench_sag.py", "test_attention_key_mass", "not N16384", 90),
    ("k-means", "Lloyd iteration N=1M d=768 K=10k vs chunked fp32 / tf32 PyTorch", "bench_kmeans.py",
     "test_lloyd_iteration", "N1000000", 60),
    ("Sinkhorn", "Sinkhorn 512x5000 / 1024x10000 / 4096x10000 vs SwAV, eager and compiled", "bench_sinkhorn.py",
     "test_sinkhorn", "not sgengine-torch", 90),
    ("SAG degrade", "fused degrade vs the PyTorch chain (eager, compiled), B=256 32x32", "bench_sag.py",
     "test_sag_degrade", "32x32", 60),
    ("DiT attention", "key mass of SD3-medium's image queries (B=2, 24 heads, 4096 image + 333 text tokens) vs "
     "the materialised map: time, max_memory_allocated and their ratio", "bench_dit.py", "test_dit_key_mass",
     "img4096", 60),
    ("DiT guided step", "one step of an SD3 transformer (8 blocks of 24 x 64, 1024 image tokens, B=2) through "
     "diffusers' guider protocol: SAG+CFG and PAG+CFG over CFG (needs diffusers)", "bench_dit.py",
     "test_dit_guider_step", "latent64", 60),
]


def kernel_steps(smoke: bool) -> list[Step]:
    if smoke:
        files = sorted({f[2] for f in FAMILIES})
        return [Step("kernels", "every kernel family against its baselines, smoke sizes", 300,
                     pytest_step(files, None, True, k_all=" or ".join(f[3] for f in FAMILIES)))]
    return [Step(f"kernels: {name}", what, box, pytest_step([file], k_gpu, True, k_all=k_all))
            for name, what, file, k_all, k_gpu, box in FAMILIES]


def steps(smoke: bool) -> list[Step]:
    """The runbook's steps in priority order."""
    size = "tiny sizes" if smoke else "GPU sizes"
    sample, train = ("tiny UNet, batch 2", "tiny UNet, batch 8") if smoke else ("in32, batch 256", "in32, batch 128")
    return [
        Step("correctness", f"every kernel at the benchmarks' {size} under the error budget (untimed)", 150,
             pytest_step(KERNELS, None, timed=False, k_all="sgengine and not sgengine-torch")),
        *kernel_steps(smoke),
        Step("sag_step", f"SAG+CFG step vs CFG step, {sample}", 90,
             pytest_step(["bench_sag_step.py"], None, True)),
        Step("train: eager", f"training img/s, {train}, eager", 60, train_step(compiled=False)),
        Step("train: compiled", f"training img/s, {train}, torch.compile", 180,
             train_step(compiled=True), 60),
        Step("compare", "equal-budget comparison on " + ("the digits" if smoke else "Tiny ImageNet 32x32"), 1e9,
             compare_step, 120),
    ]


# -- environment and outputs ----------------------------------------------------------------------

def _command(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def environment(smoke: bool, commit: str | None = None) -> dict:
    """GPU, driver, versions and the date, recorded before anything runs."""
    import torch
    import triton
    on_gpu = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if on_gpu else None
    name = props.name if props else None
    gpu = roofline.gpu_for(name) if name else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "smoke (tiny sizes, Triton interpreter)" if smoke else "gpu", "gpu": name,
            "sm_count": props.multi_processor_count if props else None,
            "memory_gb": round(props.total_memory / 2**30, 1) if props else None,
            "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
            "python": sys.version.split()[0], "commit": commit or _command(["git", "rev-parse", "--short", "HEAD"]),
            "roofline_gpu": gpu.name if gpu else None}


def bench_json(r: Run) -> dict:
    """Every timed row so far, in the shape report.py reads."""
    rows = [row for s in r.steps for row in s.get("rows", []) if row.get("stats")]
    return {"datetime": r.env["date"], "machine_info": r.env, "benchmarks": rows}


def _counts(outcomes: list[dict]) -> str:
    calls = [o for o in outcomes if o["when"] == "call" or o["outcome"] != "passed"]
    return ", ".join(f"{sum(o['outcome'] == k for o in calls)} {k}" for k in ("passed", "failed", "skipped")
                     if any(o["outcome"] == k for o in calls))


def markdown(r: Run) -> str:
    env = r.env
    lines = [f"# GPU runbook: {env['gpu'] or 'no GPU'}, {env['date'][:10]}", "",
             f"{env['mode']}; driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton "
             f"{env['triton']}, Python {env['python']}, commit {env['commit']}; roofline peaks: "
             f"{env['roofline_gpu'] or 'none (not one of the four GPUs in roofline.py)'}.", "",
             "| step | what | status | wall s | CPU s | tests |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['what']} | {(s['status'] + ' ' + s.get('reason', '')).strip()} | {s['seconds']:.0f} | "
              f"{s['cpu_s']:.0f} | {_counts(s.get('outcomes', []))} |" for s in r.steps]
    failures = [o for s in r.steps for o in s.get("outcomes", []) if o["outcome"] == "failed"]
    lines += ["", "Failures:", ""] + [f"- `{o['nodeid']}`: {o['message']}" for o in failures] if failures else []
    if bench_json(r)["benchmarks"]:
        lines += ["", report.render(bench_json(r))]
    lines += train_table(r) + compare_section(r)
    return "\n".join(lines) + "\n"


def train_table(r: Run) -> list[str]:
    runs = [s["train"] for s in r.steps if s.get("train")]
    if not runs:
        return []
    lines = ["", "### training (sgengine.training.bench)", "",
             "| compile | batch | img/s | GFLOP/img | MFU | of roofline |", "| --- | --- | --- | --- | --- | --- |"]
    for t in runs:
        pct = f"{t['roofline_pct']:.1f}%" if t.get("roofline_pct") else "-"
        mfu = f"{t['mfu']:.1%}" if t.get("mfu") else "-"
        lines.append(f"| {t['compile'] or 'eager'} | {t['global_batch']} | {t['img_per_s']:.4g} | "
                     f"{t['flops_per_img'] / 1e9:.4g} | {mfu} | {pct} |")
    return lines


def compare_section(r: Run) -> list[str]:
    done = next((s["compare"] for s in r.steps if s.get("compare")), None)
    if not done:
        return []
    from sgengine.experiment import markdown_table
    return ["", markdown_table(done).replace("# Equal", "### Equal", 1)]


def write(r: Run) -> None:
    """runbook.json, bench.json and runbook.md, each replaced whole."""
    summary = {"environment": r.env, "steps": r.steps}
    for name, text in (("runbook.json", json.dumps(summary, indent=1, default=str)),
                       ("bench.json", json.dumps(bench_json(r), indent=1, default=str)), ("runbook.md", markdown(r))):
        atomic_write(r.out / name, lambda tmp, text=text: tmp.write_text(text))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_steps(r: Run, steps: list[Step]) -> None:
    """Each step in order inside its box and the overall deadline; results written after each."""
    for step in steps:
        timeout, t0, cpu0 = min(step.box_s, r.left()), time.monotonic(), _children_cpu_s()
        if timeout < (1.0 if r.smoke else step.min_s):
            result = {"status": "skipped", "reason": f"{max(r.left(), 0):.0f} s left (< {step.min_s:.0f})"}
        else:
            try:
                result = step.run(r, timeout)
            except Exception as err:  # one broken step must not cost the others their turn
                result = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
        r.steps.append({"name": step.name, "what": step.what, "seconds": time.monotonic() - t0,
                        "cpu_s": _children_cpu_s() - cpu0, **result})
        write(r)
        print(f"runbook: {step.name}: {result['status']} in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for runbook.json / .md / .log and bench.json")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together (default 450)")
    p.add_argument("--data", default=None, help=f"{DATA_NAME} or its unpacked folder (default: .data/ or ../shared/data)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes even on a GPU (always so without one)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--commit", default=None, help="the commit measured, where the tree has no .git (a GPU machine)")
    args = p.parse_args(argv)
    import torch
    smoke = args.smoke or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runbook.log").write_text("")
    with tempfile.TemporaryDirectory(prefix="sg-runbook-", dir=args.work) as work:
        r = Run(out, Path(work), smoke, time.monotonic() + args.budget, args.data)
        r.env = environment(smoke, args.commit)
        write(r)
        run_steps(r, steps(smoke))
    print((out / "runbook.md").read_text())
    return 0 if all(s["status"] in ("ok", "skipped") for s in r.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
