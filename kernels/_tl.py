"""Triton device helpers shared by the kernels, with the interpreter's bf16 quirks handled.

Triton 3.9's interpreter (TRITON_INTERPRET=1, used for CPU tests) multiplies bfloat16 dot
operands as raw uint16 bits and truncates fp32 -> bf16 casts; compiled GPU code does neither.
These helpers take a constexpr flag so the GPU path compiles to the plain instruction.
(kernels/_kmeans_triton.py inlines the same upcast: nested jit calls are slow under the interpreter.)
"""
import triton
import triton.language as tl


@triton.jit
def dot_f32(a, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """a @ b with fp32 accumulation. INTERP_BF16 (bfloat16 under the interpreter): the Triton
    interpreter multiplies bfloat16 operands as raw uint16 bits, so there they go through fp32
    (exact: bf16 products fit in fp32)."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def round_cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter's fp32 -> bfloat16 cast truncates
    (the GPU rounds), so there the rounding is done on the bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
