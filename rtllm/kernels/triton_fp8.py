"""FP8 (e4m3fn) encoding inside Triton kernels: the FP8 KV-cache writes and the activation quantization.

Triton's own fp32 -> float8e4nv conversion is round-to-nearest-even on the GPU (sm_89+: one
``cvt.rn.satfinite.e4m3x2.f32`` per two values), but the CPU interpreter (TRITON_INTERPRET=1, where
the kernels are tested) rounds some ties and small values wrongly. So under the interpreter the byte
is built with integer operations that match ``torch.Tensor.to(torch.float8_e4m3fn)`` bit for bit;
compiled, the hardware conversion gives the same bits for ~15x fewer instructions, which the
ALU-bound quantization kernels need (e.g. SiLU-and-mul + quantization of a 14336-wide row).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rtllm.kernels.triton_round import COMPILED

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def e4m3_bits(x):
    """fp32 x -> uint8 e4m3fn code of clamp(x, -448, 448), round to nearest, ties to even: the
    hardware conversion when compiled, the integer encoding under the interpreter (same bits)."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    if COMPILED:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:  # an explicit else: a compiled constexpr if checks a trailing return against the branch's
        return _e4m3_bits_int(x)


@triton.jit
def _e4m3_bits_int(x):
    """e4m3_bits of a clamped x by integer operations.

    Normal range (|x| >= 2^-6): keep 3 of fp32's 23 mantissa bits by adding half an ulp (plus the
    kept lsb, for ties to even) and shifting; a carry moves into the exponent as it should, and
    the exponent bias moves from 127 to 7 (960 = 120 << 3). Subnormals (steps of 2^-9): round
    |x| * 2^9 to an integer through the 2^23 trick (one fp32 rounding, ties to even); code 8 is
    2^-6, the first normal, so the two ranges meet."""
    b = x.to(tl.int32, bitcast=True)
    sign = (b >> 24) & 0x80
    a_bits = b & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - 960
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    return (code | sign).to(tl.uint8)
