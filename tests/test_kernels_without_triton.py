"""sgengine.kernels on a machine without triton (macOS, Windows: pyproject installs it on Linux
only): the package imports, backend="auto" resolves to PyTorch even for CUDA tensors, every op
runs its torch path, and backend="triton" fails with the install hint."""
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # every `import triton` now raises ImportError
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import sgengine.kernels as K

    with FakeTensorMode():  # CUDA tensors without a GPU: what "auto" sees on a CUDA machine
        on_cuda = torch.empty(4, 3, device="cuda")
    assert K.resolve_backend("auto", on_cuda) == "torch"

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(217, 20, generator=g), torch.randn(5, 20, generator=g)
    ids, sq = K.kmeans_assign(x, c)
    ref_ids, ref_sq = K.kmeans_assign_ref(x, c)
    assert torch.equal(ids, ref_ids) and torch.equal(sq, ref_sq)
    q = torch.randn(1, 2, 33, 16, generator=g)
    out, mass = K.attention_with_key_mass(q, q, q)
    assert torch.equal(mass, K.attention_with_key_mass_ref(q, q, q)[1])
    codes = K.sinkhorn(torch.randn(37, 11, generator=g))
    assert torch.allclose(codes.sum(1), torch.ones(37))
    img = torch.randn(1, 2, 16, 16, generator=g)
    K.sag_degrade(img, img, img, torch.rand(1, 4, 4, generator=g) * 2, 1.0, 0.5)
    try:
        K.kmeans_assign(x, c, backend="triton")
    except RuntimeError as e:
        assert "pip install triton" in str(e), e
    else:
        raise AssertionError("backend='triton' ran without triton")
    loaded = [m for m, mod in sys.modules.items() if m.split(".")[0] == "triton" and mod is not None]
    assert not loaded, loaded
    print("ok")
""")


def test_import_and_torch_backend_without_triton():
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
