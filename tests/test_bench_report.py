"""benchmarks/report.py: the README tables from a pytest-benchmark JSON file."""
import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(report)


def _row(fn, params, provider, mean, **info):
    return {"name": f"{fn}[x]", "params": params, "stats": {"mean": mean},
            "extra_info": {"device": "NVIDIA H100 80GB HBM3", "provider": provider, **info}}


def test_tables_put_each_row_beside_its_baseline(tmp_path, capsys):
    rows = [
        _row("test_sinkhorn", {"provider": "sgengine", "shape": [512, 5000], "dtype": "UNSERIALIZABLE[torch.float32]"},
             "sgengine", 5e-5, gb_per_s=1500.0, Q_max_err=2e-7, roofline_pct=12.25),
        _row("test_sinkhorn", {"provider": "swav", "shape": [512, 5000], "dtype": "UNSERIALIZABLE[torch.float32]"},
             "swav", 2e-4, gb_per_s=375.0),
        _row("test_train_sgengine", {"case": ["in32", 128], "mode": "reduce-overhead"}, "sgengine", 0.02,
             img_per_s=6400.0, mfu=0.41),
        _row("test_train_diffusers_baseline", {"case": ["in32", 128], "compile_": True}, "diffusers", 0.041,
             img_per_s=3122.0),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": rows, "datetime": "2026-11-23T10:00:00"}))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Measured on NVIDIA H100 80GB HBM3, 2026-11-23")
    assert "| 512x5000, torch.float32 | sgengine | 0.05 ms | 1500 GB/s | 12.2% | max err 2.0e-07 | 0.25x |" in out
    assert "| 512x5000, torch.float32 | swav | 0.2 ms | 375 GB/s | - |  | 1.00x |" in out
    assert "| in32x128 | sgengine reduce-overhead | 20 ms | 6400 img/s | - | MFU 41.0% | 0.49x |" in out
    assert "| in32x128 | diffusers compiled | 41 ms | 3122 img/s | - |  | 1.00x |" in out
    assert out.count("### training throughput") == 1  # both functions in one family
