"""Rounding fp32 values to a narrower float dtype inside Triton kernels, bit for bit as torch rounds.

Kernels that reproduce torch's op-by-op rounding (each bf16 / fp16 op computed in fp32 and rounded to
nearest, ties to even: RMSNorm, SiLU-and-mul, RoPE as transformers computes them) round their
intermediate values with :func:`round_to`. Compiled, that is the hardware conversion. The CPU
interpreter (TRITON_INTERPRET=1, where the kernels are tested) truncates fp32 -> bf16 instead, so
there bf16 is rounded with integer operations that give the hardware's bits, at ~7 interpreted ops
a call: kernels convert their outputs (and values that mirror another kernel's stored output) with
plain ``.to`` instead, which the interpreter truncates and the kernels' tests allow for.

Compiled kernels also fuse a multiply and an add into one FMA (Triton's ``enable_fp_fusion``, on by
default), which skips the product's rounding: ``round_to(a * b) - round_to(c * d)`` became one bf16 FMA
in RoPE. Kernels that mirror torch's rounding launch with ``enable_fp_fusion=False``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# compiled kernels convert with the hardware instructions; the interpreter runs integer encodings
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (round to nearest, ties to even), returned as fp32."""
    if COMPILED or DTYPE != tl.bfloat16:  # noqa: SIM300 (DTYPE is the variable)
        return x.to(DTYPE).to(tl.float32)
    else:  # bf16 keeps fp32's top 16 bits: add half an ulp (plus the kept lsb, for ties) and cut
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
