"""FP8 (e4m3fn) inside Triton kernels: the encoding of the FP8 KV-cache writes and the activation quantization,
and the decoding of e4m3 words (FP8 KV-cache tiles, FP8 weights in the decode GEMV).

Triton's own fp32 -> float8e4nv conversion is round-to-nearest-even on the GPU (sm_89+: one
``cvt.rn.satfinite.e4m3x2.f32`` per two values), but the CPU interpreter (TRITON_INTERPRET=1, where
the kernels are tested) rounds some ties and small values wrongly. So under the interpreter the byte
is built with integer operations that match ``torch.Tensor.to(torch.float8_e4m3fn)`` bit for bit;
compiled, the hardware conversion gives the same bits for ~15x fewer instructions, which the
ALU-bound quantization kernels need (e.g. SiLU-and-mul + quantization of a 14336-wide row).
"""

from __future__ import annotations

import torch
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


@triton.jit
def e4m3_words_to_f16(w, CVT_ASM: tl.constexpr):
    """int32 words of four e4m3 codes [R, C] -> fp16 [R, 4 C] (code i of word j -> column 4 j + i), exact.
    CVT_ASM (compiled kernels): two cvt.rn.f16x2.e4m3x2 on the word's halves; Triton's own conversion of a
    byte tile repacks the bytes into 16-bit pairs first (~4 PRMT a pair on sm_90, more than the rest of
    the loop). Else (the interpreter) each byte through Triton's conversion."""
    if CVT_ASM:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 a, lo; "
            "cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            "=h,=h,=h,=h,r",
            [w],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    else:
        o0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        o1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        o2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        o3 = ((w >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    x = tl.join(tl.join(o0, o2), tl.join(o1, o3))  # [R, C, 2, 2]: [..., a, b] = code 2 a + b
    return tl.reshape(x, (w.shape[0], 4 * w.shape[1]))


def readable_as_words(t: torch.Tensor) -> bool:
    """Whether a tensor of e4m3 codes can be read as int32 words of four (``t.view(torch.int32)``, for
    :func:`e4m3_words_to_f16`): last dimension contiguous and a multiple of 4, every other stride and the
    storage offset multiples of 4."""
    return (t.stride(-1) == 1 and t.shape[-1] % 4 == 0 and t.storage_offset() % 4 == 0
            and all(s % 4 == 0 for s in t.stride()[:-1]))
