"""examples/third_party_trainer.py: a plain loop over a diffusers UNet through sgengine's documented exports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_third_party_trainer_runs_at_tiny_size(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "third_party_trainer.py"), "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NMI" in proc.stdout  # the self-labels' report
    for name in ("ddim", "heun", "euler"):
        im = Image.open(tmp_path / f"samples_{name}.png")
        assert im.size[0] > 0 and len(set(im.convert("L").getdata())) > 2  # not a blank (all-black) grid


@pytest.mark.timeout(300)
def test_sag_sd3_pipeline_example_runs():
    """examples/sag_sd3_pipeline.py: sg.sag / sg.pag / sg.seg on a tiny random SD3 pipeline."""
    pytest.importorskip("diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sag_sd3_pipeline.py")], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sag at layer transformer_blocks.1.attn" in proc.stdout and "ok: scale 0" in proc.stdout
