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
