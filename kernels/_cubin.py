"""Compile one captured launch for a GPU target without a GPU, and read what the cubin costs.

The launch is specialised exactly as triton's own ``JITFunction.run`` would specialise it on a
device (its binder and ``_pack_args``: pointer alignment, integers divisible by 16 or equal to
1, constexprs, options), then ``triton.compile`` runs with the ``ptxas`` inside triton's wheel.
``cuobjdump`` (also in the wheel) reads registers and stack from the cubin and counts local
loads/stores and matrix instructions in the SASS; ptxas's own log gives the spill bytes.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile

# Largest shared memory one block may use (opt-in maximum of dynamic shared memory), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MMA_FAMILIES = ("none", "HMMA", "HGMMA")  # worst first


def specialise(launch, cc: int):
    """(target, options, signature, constexprs, attrs) of this launch on compute capability cc."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    return (target, *kernel._pack_args(backend, launch.kwargs, bound, spec, options))


def config_text(launch, options, constexprs) -> str:
    """The declared constexprs and the launch options that shape the code, e.g.
    ``BLOCK_N=128 BLOCK_K=64 w8 s3``."""
    params = launch.kernel.params
    parts = [f"{params[path[0]].name}={value}" for path, value in sorted(constexprs.items())
             if len(path) == 1 and params[path[0]].is_constexpr]
    maxnreg = getattr(options, "maxnreg", None)
    return " ".join(parts + [f"w{options.num_warps}", f"s{options.num_stages}"]
                    + ([f"maxnreg={maxnreg}"] if maxnreg else []))


def compile_key(launch, cc: int) -> str:
    """Launches with one key compile to one cubin."""
    _, options, signature, constexprs, attrs = specialise(launch, cc)
    return repr((launch.kernel.fn.__module__, launch.name, cc, sorted(signature.items()),
                 sorted(constexprs.items()), sorted(attrs.items()), sorted(options.__dict__.items())))


def compile_and_read(launch, cc: int) -> dict:
    """Compile for sm_<cc> and return the cubin's figures (see ``read_cubin``)."""
    import triton
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = specialise(launch, cc)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's log, printed by triton: spill bytes
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
    figures = read_cubin(compiled.asm["cubin"], log.getvalue())
    figures["shared_bytes"] += compiled.metadata.shared  # static (cubin) + dynamic (triton)
    figures["dots"] = len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"]))
    return figures


def read_cubin(cubin: bytes, ptxas_log: str = "") -> dict:
    """registers, stack and spill bytes, local loads/stores, static shared bytes, MMA family."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = _cuobjdump("--dump-resource-usage", path), _cuobjdump("--dump-sass", path)
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    stack = field("STACK")
    return dict(registers=field("REG"), stack_bytes=stack,
                spill_bytes=sum(int(s) + int(l) for s, l in spills) if spills else stack,
                local_ldst=len(re.findall(r"\b(?:LDL|STL)\b", sass)), shared_bytes=field("SHARED"),
                mma=next((m for m in ("HGMMA", "HMMA") if re.search(rf"\b{m}\b", sass)), "none"))


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([_tool("cuobjdump"), flag, path], check=True, capture_output=True,
                          text=True).stdout


def _tool(name: str) -> str:
    """The CUDA tool that ships inside triton's wheel (or TRITON_<NAME>_PATH)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path
