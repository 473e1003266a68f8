"""Importing a low layer loads only that layer: `import sgengine.kernels` brings neither the trainer,
annotate, DeepSpeed nor triton (triton is imported by the first Triton launch); the top-level names
of `import sgengine` resolve on first use."""
import json
import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_kernels_import_loads_no_upper_layer_and_no_triton():
    loaded = _loaded_after("import sgengine.kernels")
    upper = sorted(m for m in loaded if m.startswith(("sgengine.training", "sgengine.annotate", "sgengine.guidance",
                                                      "sgengine.sampling", "sgengine.eval", "deepspeed")))
    assert upper == [], upper
    assert "triton" not in loaded


def test_top_level_names_resolve_lazily():
    loaded = _loaded_after("import sgengine")
    assert not any(m.startswith("sgengine.") for m in loaded), sorted(m for m in loaded if m.startswith("sgengine."))
    import sgengine as sg
    for name in sg.__all__:
        assert getattr(sg, name) is not None, name
    assert "Trainer" in dir(sg)


def test_engine_without_triton_trains_and_samples_on_the_torch_path(tmp_path):
    """`import sgengine` where importing triton fails (macOS, Windows): k-means, a training step and
    SAG sampling all run on the torch backend."""
    code = f"""
import sys
sys.modules["triton"] = None  # every `import triton` raises ImportError
import torch
import sgengine as sg
from sgengine.train import main
feats = torch.randn(200, 8)
centroids, ids = sg.kmeans(feats, 4)[:2]
assert ids.shape == (200,)
assert main(["--preset", "tiny", "--out", r"{tmp_path / 'run'}", "--device", "cpu", "--steps", "2",
             "--ckpt_every", "0", "--grid_rows", "1", "--grid_cols", "1", "--sample_steps", "1"]) == 0
gen = sg.load_generator(r"{tmp_path / 'run'}")
x = sg.sample(gen, clusters=None, n=2, w=2.0, steps=2, sag_scale=0.5)
assert torch.isfinite(x).all()
assert not [m for m, mod in sys.modules.items() if m.split(".")[0] == "triton" and mod is not None]
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
