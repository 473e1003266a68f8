"""Markdown tables, side by side with each benchmark's baseline, from a pytest-benchmark JSON file.

    python benchmarks/report.py bench.json > tables.md

One table per benchmark family; one row per (case, provider) with the mean time, the throughput
the benchmark derived (img/s, TFLOP/s or GB/s from its own formula), memory / accuracy columns
where recorded, the row's share of its roofline bound (``benchmarks/roofline.py``: 100% would be
the GPU's datasheet peak or bandwidth), and the time relative to the family's baseline on the same
case: 0.33x is three times faster than the baseline, 1.55x is 55% slower. The header names the
device and the date.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

# Parameters that choose the implementation rather than the case.
PROVIDER_PARAMS = ("provider", "mode", "compile_", "stage")
# Function -> (family, baseline label). Labels are the provider plus its other provider params.
FAMILIES = {
    "test_attention_key_mass": ("attention with per-key mass", "sdpa"),
    "test_dit_key_mass": ("key mass at SD3-medium's joint attention", "materialised"),
    "test_dit_guider_step": ("guided step of an SD3 transformer (diffusers guiders)", "cfg"),
    "test_sag_degrade": ("fused SAG degrade", "torch-chain"),
    "test_sag_cfg_step": ("SAG+CFG sampling step", "cfg"),
    "test_lloyd_iteration": ("k-means Lloyd iteration", "torch-fp32"),
    "test_cpu_assignment": ("k-means assignment, CPU 2 threads", "faiss"),
    "test_cpu_train": ("k-means full train, CPU 2 threads", "faiss"),
    "test_sinkhorn": ("Sinkhorn-Knopp", "swav"),
    "test_train_sgengine": ("training throughput", "diffusers compiled"),
    "test_train_diffusers_baseline": ("training throughput", "diffusers compiled"),
    "test_train_deepspeed_overhead": ("training throughput", "diffusers compiled"),
}
THROUGHPUT = (("img_per_s", "img/s", "{:.4g}"), ("forward_tflop_per_s", "TFLOP/s", "{:.3g}"),
              ("tflop_per_s", "TFLOP/s", "{:.3g}"), ("gb_per_s", "GB/s", "{:.4g}"))
EXTRAS = (("mfu", "MFU", "{:.1%}"), ("peak_memory_gb", "peak GB", "{:.2f}"), ("peak_gb", "peak GB", "{:.2f}"),
          ("memory_ratio", "memory vs materialised", "{:.3f}"),
          ("agreement_with_fp32", "agreement", "{:.2%}"), ("out_max_err", "max err", "{:.1e}"),
          ("x_deg_max_err", "max err", "{:.1e}"), ("Q_max_err", "max err", "{:.1e}"))


def _label(row: dict) -> str:
    """The implementation: recorded provider plus mode / compile / ZeRO stage where parametrised."""
    params, words = row.get("params") or {}, [row["extra_info"].get("provider", "?")]
    if "mode" in params:
        words.append(params["mode"])
    if "compile_" in params:
        words.append("compiled" if params["compile_"] else "eager")
    return " ".join(words)


def _value(v) -> str:
    """A parameter as a short string: shapes as 16x1024, dtypes without pytest-benchmark's wrapper."""
    if isinstance(v, (list, tuple)):
        return "x".join(_value(x) for x in v)
    text = str(v)
    return text[len("UNSERIALIZABLE["):-1] if text.startswith("UNSERIALIZABLE[") else text


def _case(row: dict) -> str:
    params = row.get("params") or {}
    return ", ".join(_value(v) for k, v in params.items() if k not in PROVIDER_PARAMS) or "-"


def _family(row: dict) -> tuple[str, str]:
    fn = row["name"].split("[")[0]
    return FAMILIES.get(fn, (fn, ""))


def group(rows: list[dict]) -> dict:
    """{family: {case: {label: row}}} in the file's order."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[_family(row)[0]][_case(row)][_label(row)] = row
    return out


def _cell(info: dict, specs) -> tuple[str, str]:
    for key, unit, fmt in specs:
        if info.get(key) is not None:
            return unit, fmt.format(info[key])
    return "", ""


def table(family: str, cases: dict, baseline: str) -> list[str]:
    lines = [f"### {family}", "", "| case | provider | mean | throughput | of roofline | extra "
             f"| time vs {baseline or 'baseline'} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for case, by_label in cases.items():
        base = by_label.get(baseline)
        for label, row in by_label.items():
            mean, info = row["stats"]["mean"], row["extra_info"]
            unit, value = _cell(info, THROUGHPUT)
            extra = " ".join(f"{u} {v}" for u, v in (_cell(info, [s]) for s in EXTRAS) if v)
            ratio = f"{mean / base['stats']['mean']:.2f}x" if base else "n/a"
            pct = f"{info['roofline_pct']:.1f}%" if info.get("roofline_pct") is not None else "-"
            lines.append(f"| {case} | {label} | {mean * 1e3:.4g} ms | {value} {unit} | {pct} | {extra} | {ratio} |")
    return lines + [""]


def render(data: dict) -> str:
    rows = [r for r in data["benchmarks"] if r.get("stats")]  # untimed rows (--benchmark-disable) have none
    device = next((r["extra_info"]["device"] for r in rows if "device" in r["extra_info"]), "unknown device")
    lines = [f"Measured on {device}, {data.get('datetime', '')[:10]} (pytest-benchmark means).", ""]
    baselines = {_family(r)[0]: _family(r)[1] for r in rows}
    for family, cases in group(rows).items():
        lines += table(family, cases, baselines[family])
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="the file written by pytest benchmarks --benchmark-json FILE")
    args = p.parse_args(argv)
    with open(args.json) as fh:
        print(render(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
