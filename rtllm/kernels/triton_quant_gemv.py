"""GEMV-shaped weight-only kernels for decode (1..4 activation rows; rtllm.kernels.quant_gemm uses
them up to its W4_GEMV_MAX_M / W8_GEMV_MAX_M): W4 (int4 group-wise) and W8 (int8 or e4m3 bytes,
per-channel scales), on CUDA cores; W4 also on tensor cores (below). Dense 16-bit weights run the W8
loop with a conversion for the decode (``w16_gemv``; rtllm.kernels.gemm uses it up to DENSE_GEMV_MAX_M).

Semantics are those of :mod:`rtllm.kernels.quant_gemm` (same layouts, ``y = x @ W^T``), computed
exactly in fp32 except for the sums: each weight code is decoded exactly, multiplied by the
activation in fp32, summed in fp32 and rounded once to x's dtype. (The tensor-core kernels round
W to x's 16-bit dtype first; these never do, so they are at least as close to the exact product.)

Why not ``tl.dot``: at M = 1 a tensor-core tile pads M to 16 and the dequantized tile must be
moved into the MMA operand layout through shared memory; a GEMV needs neither. Each program owns
BLOCK_N output features and a range of K (split-K when N alone gives too few programs), loads the
packed weights with 16-byte loads that are contiguous across the warp, decodes them in registers
and keeps per-thread fp32 partial sums; the reduction over K happens once at the end.

Decoding costs about 3 instructions per weight (sm_90 SASS of the W4 loop: ~4.3 per int4 weight with
the activation loads, so on an H100 its ALU and memory times are of the same size; W8 / FP8 decode
a byte for about the same and are memory-bound; figures in docs/PERF.md):

- W4: the word ``w`` (8 nibbles, K-major) is not shifted per nibble. ``(w & (0xF << s)) | magic``
  places nibble s/4 in the mantissa of the fp32 ``2^(23-s) + q`` (exact), and one FADD of
  ``-(2^(23-s) + 8)`` gives ``q - 8`` exactly: LOP3 + FADD + FFMA per weight. Nibbles 5..7 do not
  fit under the exponent and are read from ``w >> 16`` (one shift per word). ``magic`` and the 16
  are kernel arguments so that the compiler keeps them in registers and cannot fold mask and
  shift into bit-field extracts. The group's scale and zero apply once per group and column:
  ``sum_k x_k ((q - 8) s + z) = s sum_k x_k (q - 8) + z sum_k x_k``.
- W8 int8: ``q + 0x4B000080`` (integer add on the sign-extended byte) is the fp32 ``2^23 + 128 + q``;
  an FADD gives q exactly. e4m3: Hopper's paired e4m3 -> f16 conversion (exact), then f16 -> f32.
  The per-channel scale multiplies the finished sum.

W4 on tensor cores (``GemvConfig.tc``, 16-bit x): the weights are the MMA's A operand (BLOCK_N rows
of m64 MMAs, swap-AB) and x^T, zero-padded to 16 columns, is B, so the multiply-adds leave the CUDA
cores. ``((w >> s) & 0x000F000F) | 0x43004300`` is the bf16 pair (2^7 + q, 2^7 + q') of two nibbles
of a word and one packed subtract (``sub.bf16x2``, inline asm; fp16 likewise with 2^10) makes both
q - 8, exact: 11 instructions per word of 8 weights. The operand's K axis is permuted so that each
such pair is one register of the A fragment as Triton lays it out (loaded by ldmatrix from the
pipelined shared-memory copy of the words), and x is read in the same order. The decoded weight is
q - 8, exact in bf16; the scale and zero apply per group to the fp32 MMA sums as on the CUDA cores,
so the result is the same up to fp32 summation order. sm_90 SASS: ~2.6-2.9 instructions per int4
weight against ~4.6, and a second row costs little, but each K tile waits on its MMA (an H100
measured it latency-bound; x's next tile is loaded by hand a tile ahead, which saved 1 us on down):
it wins at M = 2 on every shape and at M = 1 on down only. The interpreter cannot run inline asm or
a bf16 dot: it decodes with integer ops and multiplies in fp32 (the same products).

Programmatic dependent launch (PDL, Hopper; rtllm.kernels.triton_attention.common.pdl_enabled): a
GEMV is launched while the kernel before it (a norm, the attention, another GEMV) still runs; each
program lets the next launch start, requests its first weight tile, and only then waits for the
previous kernel (``gdc_wait``) before it reads x. The weight stream so starts during the previous
kernel's tail instead of after it. (The W4 tensor-core kernel waits before its first load: x's.)

Split-K without a second kernel: with SPLIT > 1 each program writes its fp32 partial to a
workspace and bumps a per-N-tile counter (acq_rel); the program that arrives last sums the
partials in split order (deterministic), writes the output in x's dtype and resets the counter to
zero for the next launch. The workspace is allocated once per device, outside CUDA-graph capture
(a captured graph keeps pointing at it); a launch that would need it during a capture before it
exists, or more of it than there is, falls back to partials summed by torch.

SiLU-and-mul in the epilogue (``silu_and_mul=True``, the gated MLP's fused gate|up projection, N = 2I
outputs [gate | up]): a program's BLOCK_N weight columns / rows are BLOCK_N / 2 gate features
n..n+BLOCK_N/2 and the same up features I+n.., so it holds both operands of its outputs and writes
``silu(gate) * up`` [M, I] instead of gate|up [M, 2I] (with split-K: the last program, from the
summed partials). Loads, programs and splits are those of the unfused launch with the same
configuration; the epilogue rounds gate and up to x's dtype and then computes as
rtllm.kernels.triton_activation does (its ``silu_mul``), so the output equals the unfused GEMV +
SiLU-and-mul kernel bit for bit. It saves the activation kernel's launch and the [M, 2I] round trip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_activation import silu_and_mul_triton, silu_mul
from rtllm.kernels.triton_attention.common import interpreting, pdl_enabled, sm_count
from rtllm.kernels.triton_quant_gemv_config import TUNED, GemvConfig, gemv_config

__all__ = ["TUNED", "GemvConfig", "gemv_config", "w4_gemv", "w8_gemv", "w16_gemv"]

# W4: fp32 bits of 2^23 (nibble s/4 of a word uses MAGIC - (s << 23), i.e. 2^(23 - s))
_W4_MAGIC = 0x4B000000
# W8: fp32 bits of 2^23 + 128; (q + this) for a signed byte q is the fp32 2^23 + 128 + q
_W8_MAGIC = 0x4B000080

WORKSPACE_FLOATS = 1 << 21  # 8 MiB of fp32 partials per device
WORKSPACE_TILES = 1 << 14  # counters: one per N tile of a launch
MAX_GEMV_M = 4  # the GEMV kernels unroll one accumulator per activation row, up to this many
# Without a config on the CPU interpreter (the engine's launches in the tests): large tiles, no split. The
# interpreter's cost is per operation, not per element, so these run far fewer operations than the GPU
# tiles would; the kernel tests pass their own configs (small tiles, splits, ragged edges).
INTERPRETED = GemvConfig(64, 128, 1, 4)


# --------------------------------------------------------------------------------------------
# the program's columns, and the epilogue (SiLU-and-mul, split-K)


@triton.jit
def _columns(pid_n, N, HALF, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """(weight columns, their mask, output columns, their mask) of N tile pid_n. GATED (N = 2 HALF):
    BLOCK_N / 2 gate columns and the same up columns (+ HALF), in two contiguous runs; the outputs
    are the gate columns' indices."""
    i = tl.arange(0, BLOCK_N)
    if GATED:
        H: tl.constexpr = BLOCK_N // 2
        col = pid_n * H + i % H
        offs_o = pid_n * H + tl.arange(0, H)
        return col + (i // H) * HALF, col < HALF, offs_o, offs_o < HALF
    else:  # an explicit else: a compiled constexpr if checks a trailing return against the branch's
        offs = pid_n * BLOCK_N + i
        return offs, offs < N, offs, offs < N


@triton.jit
def _store_row(acc, m, out_ptr, offs_o, mask_o, stride_om, GATED: tl.constexpr):
    """Row m of the output from its fp32 sums over the tile's columns; GATED: silu(gate) * up, gate
    and up rounded to the output dtype first (the values the unfused GEMV would store)."""
    DT: tl.constexpr = out_ptr.dtype.element_ty
    if GATED:
        g, u = tl.split(tl.permute(tl.reshape(acc, (2, acc.shape[0] // 2)), (1, 0)))
        acc = silu_mul(g.to(DT).to(tl.float32), u.to(DT).to(tl.float32), DT)
    tl.store(out_ptr + m * stride_om + offs_o, acc.to(DT), mask=mask_o)


@triton.jit
def _finish(acc, m, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
            M: tl.constexpr, PARTIAL: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
    """Row m's result, or with PARTIAL its fp32 partial (ws [splits, M, N], split pid_k)."""
    if PARTIAL:
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, acc, mask=mask_n)
    else:
        _store_row(acc, m, out_ptr, offs_o, mask_o, stride_om, GATED)


@triton.jit
def _reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits,
                   M: tl.constexpr, REDUCE: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
    """After every row's partial is stored: the last program of this N tile sums the partials, in split
    order, CHUNK loads at a time (one L2 round trip per chunk, not per partial: the W4 qkv / o
    launches of 32 splits took 0.6-0.9 us less on an H100)."""
    CHUNK: tl.constexpr = 8
    if REDUCE:
        tl.debug_barrier()  # all of this program's partial stores happen before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            for m in tl.static_range(M):
                tot = tl.zeros(offs_n.shape, dtype=tl.float32)
                for s0 in range(0, n_splits, CHUNK):  # the chunk's loads are in flight together
                    for i in tl.static_range(CHUNK):
                        tot += tl.load(ws_ptr + ((s0 + i) * M + m) * N + offs_n, mask=mask_n & (s0 + i < n_splits),
                                       other=0.0, cache_modifier=".cg")
                _store_row(tot, m, out_ptr, offs_o, mask_o, stride_om, GATED)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


# --------------------------------------------------------------------------------------------
# W4


@triton.jit
def _w4_nibble(w, hi, j: tl.constexpr, MAGIC):
    """q - 8 (fp32, exact) for nibble j of the words w (hi = w >> 16)."""
    if j < 5:
        src = w
        s: tl.constexpr = 4 * j
    else:
        src = hi
        s: tl.constexpr = 4 * (j - 4)
    bits = (src & (0xF << s)) | (MAGIC - (s << 23))
    return bits.to(tl.float32, bitcast=True) - ((1 << (23 - s)) + 8)


@triton.jit
def _w4_load(qw_ptr, k0, rows, offs_n, mask_n, stride_qk):
    return tl.load(qw_ptr + (k0 // 8 + rows)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)


@triton.jit
def _w4_row(t, xs, qf, xk):
    x = tl.load(xk).to(tl.float32)
    return t + qf * x[:, None], xs + x


@triton.jit
def _w4_group_sum(acc, t, xs, s, z):
    return acc + tl.sum(t, axis=0) * s + tl.sum(xs, axis=0) * z


@triton.jit(do_not_specialize=["T_PER_SPLIT", "n_splits"])
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, HALF, NUM_T, T_PER_SPLIT, n_splits, MAGIC, SH16,
    stride_xm, stride_qk, stride_sg, stride_om,
    GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, PARTIAL: tl.constexpr, REDUCE: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), n_splits). Program (n tile, split) reduces K tiles
    [split * T_PER_SPLIT, ...) (of BLOCK_K; a split holds whole groups) for M (1..4) rows. With
    PREFETCH the next tile's words are loaded before the current one is decoded. PDL: as the module says."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    R: tl.constexpr = BLOCK_K // 8  # packed words per column per tile
    TPG: tl.constexpr = GROUP // BLOCK_K  # tiles per group
    offs_n, mask_n, offs_o, mask_o = _columns(pid_n, N, HALF, BLOCK_N, GATED)
    rows = tl.arange(0, R)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t0 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    t1 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    t2 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    t3 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    xs0 = tl.zeros((R,), dtype=tl.float32)
    xs1 = tl.zeros((R,), dtype=tl.float32)
    xs2 = tl.zeros((R,), dtype=tl.float32)
    xs3 = tl.zeros((R,), dtype=tl.float32)
    t_lo = pid_k * T_PER_SPLIT
    t_hi = tl.minimum(t_lo + T_PER_SPLIT, NUM_T)
    w_next = _w4_load(qw_ptr, t_lo * BLOCK_K, rows, offs_n, mask_n, stride_qk)
    if PDL:
        gdc_wait()
    for tile in range(t_lo, t_hi):
        k0 = tile * BLOCK_K
        if PREFETCH:
            w = w_next
            w_next = _w4_load(qw_ptr, tl.minimum(tile + 1, t_hi - 1) * BLOCK_K, rows, offs_n, mask_n, stride_qk)
        else:
            w = _w4_load(qw_ptr, k0, rows, offs_n, mask_n, stride_qk)
        hi = w >> SH16
        for j in tl.static_range(8):
            qf = _w4_nibble(w, hi, j, MAGIC)
            xk = x_ptr + k0 + rows * 8 + j
            t0, xs0 = _w4_row(t0, xs0, qf, xk)
            if M > 1:
                t1, xs1 = _w4_row(t1, xs1, qf, xk + stride_xm)
            if M > 2:
                t2, xs2 = _w4_row(t2, xs2, qf, xk + 2 * stride_xm)
            if M > 3:
                t3, xs3 = _w4_row(t3, xs3, qf, xk + 3 * stride_xm)
        if (tile + 1) % TPG == 0:  # the group ends: its scale and zero apply once
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc0 = _w4_group_sum(acc0, t0, xs0, s, z)
            t0 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
            xs0 = tl.zeros((R,), dtype=tl.float32)
            if M > 1:
                acc1 = _w4_group_sum(acc1, t1, xs1, s, z)
                t1 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
                xs1 = tl.zeros((R,), dtype=tl.float32)
            if M > 2:
                acc2 = _w4_group_sum(acc2, t2, xs2, s, z)
                t2 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
                xs2 = tl.zeros((R,), dtype=tl.float32)
            if M > 3:
                acc3 = _w4_group_sum(acc3, t3, xs3, s, z)
                t3 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
                xs3 = tl.zeros((R,), dtype=tl.float32)
    _finish(acc0, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 1:
        _finish(acc1, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 2:
        _finish(acc2, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 3:
        _finish(acc3, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    _reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
                   REDUCE, GATED)


# --------------------------------------------------------------------------------------------
# W4 on tensor cores (swap-AB)


@triton.jit
def _w4_pair(w, SHIFT: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr):
    """(q - 8, q' - 8) in dtype (exact) for nibbles SHIFT/4 and SHIFT/4 + 4 of the words w. ASM: one LOP3
    makes the 16-bit pair 2^7 + q | 2^7 + q' (bf16; fp16 2^10 + q) in one register and one packed
    subtract of 2^7 + 8 gives both codes, already where the MMA operand wants them."""
    v = w >> SHIFT
    if ASM:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, c; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xea; mov.b32 c, 0x43084308; "
                "sub.bf16x2 t, t, c; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [v], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, c; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xea; mov.b32 c, 0x64086408; "
                "sub.f16x2 t, t, c; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [v], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    lo = ((v & 0xF) - 8).to(tl.float32).to(dtype)
    hi = (((v >> 16) & 0xF) - 8).to(tl.float32).to(dtype)
    return lo, hi


@triton.jit
def _w4_operand(w, dtype: tl.constexpr, ASM: tl.constexpr):
    """The MMA operand A [BLOCK_N, 8 R] (q - 8 in dtype) of the words w [R, BLOCK_N] (R a multiple of 4),
    its K axis permuted to fit the register layout of an m64nNk16 A fragment: thread t of a quad holds
    K columns 2t, 2t + 1 (one register) and 2t + 8, 2t + 9 of each k16 step, so A's K index
    c = 32 s + 16 h + 8 u + 2 t + v is nibble (2 h + u) + 4 v of word 4 s + t (_w4_tc_k gives the
    matching K of x). Each register is then one _w4_pair of one word: no shuffles, no repacking."""
    R: tl.constexpr = w.shape[0]
    BN: tl.constexpr = w.shape[1]
    l0, h0 = _w4_pair(w, 0, dtype, ASM)
    l1, h1 = _w4_pair(w, 4, dtype, ASM)
    l2, h2 = _w4_pair(w, 8, dtype, ASM)
    l3, h3 = _w4_pair(w, 12, dtype, ASM)
    a = tl.join(tl.join(tl.join(l0, h0), tl.join(l1, h1)), tl.join(tl.join(l2, h2), tl.join(l3, h3)))
    a = tl.reshape(a, (R // 4, 4, BN, 2, 2, 2))  # (s, t, n, v, u, h)
    return tl.reshape(tl.permute(a, (2, 0, 5, 4, 1, 3)), (BN, 8 * R))


@triton.jit
def _w4_tc_k(BLOCK_K: tl.constexpr):
    """K offset (within the tile) of the operand's K column c: nibble (2 h + u) + 4 v of word 4 s + t."""
    c = tl.arange(0, BLOCK_K)
    return 8 * (4 * (c // 32) + (c // 2) % 4) + 2 * ((c // 16) % 2) + (c // 8) % 2 + 4 * (c % 2)


@triton.jit
def _w4_tc_row(zs, z, m: tl.constexpr, x_ptr, k0, stride_xm, BLOCK_K: tl.constexpr):
    """Row m's zero-point term of one group: z * sum_k x[m, k] over the group."""
    xs = tl.sum(tl.load(x_ptr + m * stride_xm + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), axis=0)
    return zs + z * xs


@triton.jit
def _w4_tc_col(acc, m: tl.constexpr):
    """Column m of the [BLOCK_N, 16] accumulator."""
    return tl.sum(tl.where(tl.arange(0, acc.shape[1])[None, :] == m, acc, 0.0), axis=1)


@triton.jit(do_not_specialize=["T_PER_SPLIT", "n_splits"])
def _w4_tc_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, HALF, NUM_T, T_PER_SPLIT, n_splits,
    stride_xm, stride_qk, stride_sg, stride_om,
    GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    PARTIAL: tl.constexpr, REDUCE: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The W4 GEMV on tensor cores, weights as the MMA's A operand ([BLOCK_N, BLOCK_K] per tile, decoded
    in registers by _w4_operand), x^T as B ([BLOCK_K, 16], rows beyond M zero). Grid, splits and
    epilogue as _w4_gemv_kernel's; a group's MMA sums (fp32) take its scale once, its zero as
    z * sum_k x over the group. PDL: waits before its first load (x's)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    DT: tl.constexpr = x_ptr.dtype.element_ty
    MP: tl.constexpr = 16  # x's rows padded to the MMA's N
    R: tl.constexpr = BLOCK_K // 8
    TPG: tl.constexpr = GROUP // BLOCK_K
    offs_n, mask_n, offs_o, mask_o = _columns(pid_n, N, HALF, BLOCK_N, GATED)
    rows = tl.arange(0, R)
    kx = _w4_tc_k(BLOCK_K)
    mc = tl.arange(0, MP)
    acc = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
    t = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
    zs0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zs1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zs2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zs3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_lo = pid_k * T_PER_SPLIT
    t_hi = tl.minimum(t_lo + T_PER_SPLIT, NUM_T)
    x_next = tl.load(x_ptr + mc[None, :] * stride_xm + (t_lo * BLOCK_K + kx)[:, None], mask=(mc < M)[None, :],
                     other=0.0)
    for tile in range(t_lo, t_hi):
        k0 = tile * BLOCK_K
        w = _w4_load(qw_ptr, k0, rows, offs_n, mask_n, stride_qk)
        xb = x_next  # by hand: a load that feeds the MMA through shared memory is not pipelined
        k1 = tl.minimum(tile + 1, t_hi - 1) * BLOCK_K
        x_next = tl.load(x_ptr + mc[None, :] * stride_xm + (k1 + kx)[:, None], mask=(mc < M)[None, :], other=0.0)
        if ASM:
            t = tl.dot(_w4_operand(w, DT, ASM), xb, t)
        else:  # the interpreter's dot multiplies bf16 bit patterns as integers: fp32 (the same products)
            t = tl.dot(_w4_operand(w, tl.float32, ASM), xb.to(tl.float32), t)
        if (tile + 1) % TPG == 0:  # the group ends: its scale and zero apply once
            g = k0 // GROUP
            k_g = g * GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += t * s[:, None]
            t = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
            zs0 = _w4_tc_row(zs0, z, 0, x_ptr, k_g, stride_xm, GROUP)
            if M > 1:
                zs1 = _w4_tc_row(zs1, z, 1, x_ptr, k_g, stride_xm, GROUP)
            if M > 2:
                zs2 = _w4_tc_row(zs2, z, 2, x_ptr, k_g, stride_xm, GROUP)
            if M > 3:
                zs3 = _w4_tc_row(zs3, z, 3, x_ptr, k_g, stride_xm, GROUP)
    _finish(_w4_tc_col(acc, 0) + zs0, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
            PARTIAL, GATED)
    if M > 1:
        _finish(_w4_tc_col(acc, 1) + zs1, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    if M > 2:
        _finish(_w4_tc_col(acc, 2) + zs2, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    if M > 3:
        _finish(_w4_tc_col(acc, 3) + zs3, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    _reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
                   REDUCE, GATED)


# --------------------------------------------------------------------------------------------
# W8 (int8 or e4m3 bytes)


@triton.jit
def _w8_decode(q, MAGIC, FP8: tl.constexpr, W16: tl.constexpr):
    if W16:  # a 16-bit weight: exact in fp32
        return q.to(tl.float32)
    if FP8:
        return q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return (q.to(tl.int32) + MAGIC).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128


@triton.jit
def _w8_load(qw_ptr, offs_n, mask_n, offs_k, k_hi, stride_qn, EVEN_K: tl.constexpr):
    ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=mask_n[:, None], other=0)
    return tl.load(ptrs, mask=mask_n[:, None] & (offs_k < k_hi)[None, :], other=0)


@triton.jit
def _w8_row(t, w, xk, k_hi, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(xk)
    else:
        x = tl.load(xk, mask=tl.arange(0, w.shape[1]) < k_hi, other=0.0)
    return t + w * x.to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["n_splits"])
def _w8_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, HALF, K, K_PER_SPLIT, n_splits, MAGIC,
    stride_xm, stride_qn, stride_om,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    PARTIAL: tl.constexpr, REDUCE: tl.constexpr, FP8: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
    W16: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), n_splits); qw [N, K] bytes (int8, or e4m3 read as uint8), or with W16
    the 16-bit weight itself (no scales). K range [split * K_PER_SPLIT, ...), K_PER_SPLIT a multiple of
    BLOCK_K. PDL: as the module says."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    offs_n, mask_n, offs_o, mask_o = _columns(pid_n, N, HALF, BLOCK_N, GATED)
    cols = tl.arange(0, BLOCK_K)
    t0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    q_next = _w8_load(qw_ptr, offs_n, mask_n, k_lo + cols, k_hi, stride_qn, EVEN_K)
    if PDL:
        gdc_wait()
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            q = q_next
            k_next = tl.where(k0 + BLOCK_K < k_hi, k0 + BLOCK_K, k0)  # the last tile loads itself again
            q_next = _w8_load(qw_ptr, offs_n, mask_n, k_next + cols, k_hi, stride_qn, EVEN_K)
        else:
            q = _w8_load(qw_ptr, offs_n, mask_n, k0 + cols, k_hi, stride_qn, EVEN_K)
        w = _w8_decode(q, MAGIC, FP8, W16)
        xk = x_ptr + k0 + cols
        t0 = _w8_row(t0, w, xk, k_hi - k0, EVEN_K)
        if M > 1:
            t1 = _w8_row(t1, w, xk + stride_xm, k_hi - k0, EVEN_K)
        if M > 2:
            t2 = _w8_row(t2, w, xk + 2 * stride_xm, k_hi - k0, EVEN_K)
        if M > 3:
            t3 = _w8_row(t3, w, xk + 3 * stride_xm, k_hi - k0, EVEN_K)
    if W16:
        sc = 1.0
    else:
        sc = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _finish(tl.sum(t0, axis=1) * sc, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
            PARTIAL, GATED)
    if M > 1:
        _finish(tl.sum(t1, axis=1) * sc, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    if M > 2:
        _finish(tl.sum(t2, axis=1) * sc, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    if M > 3:
        _finish(tl.sum(t3, axis=1) * sc, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    _reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
                   REDUCE, GATED)


# --------------------------------------------------------------------------------------------
# workspace


_workspaces: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fp32 partials, int32 zeroed counters) for a split-K launch, or None when this launch cannot
    use them (too large, or a CUDA-graph capture before the workspace exists)."""
    key = (device.type, device.index)
    ws = _workspaces.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ws = (torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
              torch.zeros(WORKSPACE_TILES, dtype=torch.int32, device=device))
        _workspaces[key] = ws
    if floats > ws[0].numel() or tiles > ws[1].numel():
        return None
    return ws


def _launch_shape(N: int, k_units: int, cfg: GemvConfig) -> tuple[int, int, int]:
    """(n_tiles, units per split, splits) for k_units units of K (groups or tiles)."""
    n_tiles = triton.cdiv(N, cfg.block_n)
    split = max(1, min(cfg.split, k_units))
    per = triton.cdiv(k_units, split)
    return n_tiles, per, triton.cdiv(k_units, per)


# --------------------------------------------------------------------------------------------
# entry points


def _plan(x: torch.Tensor, M: int, N: int, n_tiles: int, splits: int, gated: bool):
    """(out, ws, counters, PARTIAL, REDUCE) for a launch of ``splits`` K splits (gated: out [M, N/2])."""
    out = torch.empty((M, N // 2 if gated else N), dtype=x.dtype, device=x.device)
    if splits == 1:
        return out, out, out, False, False
    ws = _workspace(x.device, splits * M * N, n_tiles)
    if ws is None:  # each split stores its partial; torch sums them
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
        return part, part, part, True, False
    return out, ws[0], ws[1], True, True


def _result(out: torch.Tensor, partial: bool, reduce: bool, dtype: torch.dtype, gated: bool) -> torch.Tensor:
    if partial and not reduce:  # the kernel stored split partials [splits, M, N]: torch finishes
        y = out.sum(0).to(dtype)
        return silu_and_mul_triton(y) if gated else y
    return out


def _check_gated(N: int, cfg: GemvConfig) -> None:
    assert N % 2 == 0 and cfg.block_n >= 2, (N, cfg)


def _w4_tensor_cores(x: torch.Tensor, cfg: GemvConfig, block_k: int) -> bool:
    """Whether a W4 launch runs _w4_tc_kernel: asked for by the configuration, 16-bit x (the MMA's
    operands; fp32 x stays on CUDA cores, exact), K tiles of whole operand blocks (32 K) and the
    columns of at least one m64 MMA."""
    return cfg.tc and x.dtype in (torch.bfloat16, torch.float16) and block_k % 32 == 0 and cfg.block_n >= 64


def w4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            config: GemvConfig | None = None, silu_and_mul: bool = False) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T for the W4 layout (qweight int32 [K/8, N], scales / zeros
    [K/g, N]), 1 <= M <= 4; y in x's dtype. Group g: a power of two >= 8 dividing K.
    ``silu_and_mul``: W's outputs are [gate | up] and y [M, N/2] is SiLU-and-mul of them, fused."""
    M, K = x.shape
    N = qweight.shape[1]
    assert 1 <= M <= MAX_GEMV_M, M
    assert qweight.shape[0] * 8 == K and scales.shape == zeros.shape and scales.shape[1] == N
    num_g = scales.shape[0]
    group = K // num_g
    assert group * num_g == K and group & (group - 1) == 0 and group >= 8, group
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or (INTERPRETED if interpreting(x)
                     else gemv_config(f"w4g{group}", M, N, K, sm_count(x)))
    if silu_and_mul:
        _check_gated(N, cfg)
    bk = min(cfg.block_k, group)
    tpg = group // bk
    n_tiles, g_per, splits = _launch_shape(N, num_g, cfg)
    out, ws, cnt, partial, reduce = _plan(x, M, N, n_tiles, splits, silu_and_mul)
    half = N // 2 if silu_and_mul else 0
    pdl = pdl_enabled(x)
    if _w4_tensor_cores(x, cfg, bk):
        _w4_tc_kernel[(n_tiles, splits)](
            x, qweight, scales, zeros, out, ws, cnt, N, half, num_g * tpg, g_per * tpg, splits,
            x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, ASM=not interpreting(x), PARTIAL=partial,
            REDUCE=reduce, GATED=silu_and_mul, PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.stages,
            launch_pdl=pdl,
        )  # fmt: skip
    else:
        _w4_gemv_kernel[(n_tiles, splits)](
            x, qweight, scales, zeros, out, ws, cnt, N, half, num_g * tpg, g_per * tpg,
            splits, _W4_MAGIC, 16, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, PREFETCH=cfg.prefetch, PARTIAL=partial,
            REDUCE=reduce, GATED=silu_and_mul, PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
        )  # fmt: skip
    return _result(out, partial, reduce, x.dtype, silu_and_mul)


def _row_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor | None, kind: str, config: GemvConfig | None,
              silu_and_mul: bool) -> torch.Tensor:
    """One _w8_gemv_kernel launch over the row-major weight q [N, K]: bytes (kind "w8" int8, "fp8" e4m3 read
    as uint8) with per-row scales, or a 16-bit weight (kind "w16", scales None)."""
    M, K = x.shape
    N = q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or (INTERPRETED if interpreting(x) else gemv_config(kind, M, N, K, sm_count(x)))
    if silu_and_mul:
        _check_gated(N, cfg)
    bk = cfg.block_k
    n_tiles, t_per, splits = _launch_shape(N, triton.cdiv(K, bk), cfg)
    out, ws, cnt, partial, reduce = _plan(x, M, N, n_tiles, splits, silu_and_mul)
    pdl = pdl_enabled(x)
    w16 = scales is None
    _w8_gemv_kernel[(n_tiles, splits)](
        x, q, q if w16 else scales, out, ws, cnt, N, N // 2 if silu_and_mul else 0, K, t_per * bk, splits,
        _W8_MAGIC, x.stride(0), q.stride(0), out.stride(0),
        M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, PREFETCH=cfg.prefetch, PARTIAL=partial, REDUCE=reduce,
        FP8=kind == "fp8", EVEN_K=K % bk == 0, GATED=silu_and_mul, W16=w16, PDL=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return _result(out, partial, reduce, x.dtype, silu_and_mul)


def w8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            config: GemvConfig | None = None, silu_and_mul: bool = False) -> torch.Tensor:
    """y [M, N] = (x [M, K] @ q^T) * scales for qweight int8 or float8_e4m3fn [N, K] and scales
    [N], 1 <= M <= 4; y in x's dtype. ``silu_and_mul``: as w4_gemv's."""
    M, K = x.shape
    N = qweight.shape[0]
    assert 1 <= M <= MAX_GEMV_M, M
    assert qweight.shape[1] == K and scales.shape == (N,) and qweight.stride(1) == 1
    fp8 = qweight.dtype == torch.float8_e4m3fn
    return _row_gemv(x, qweight.view(torch.uint8) if fp8 else qweight, scales, "fp8" if fp8 else "w8", config,
                     silu_and_mul)


def w16_gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None,
             silu_and_mul: bool = False) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight^T for a dense 16-bit weight [N, K] (row-major, x's dtype), 1 <= M <= 4:
    the W8 kernel's loop with the decode a conversion to fp32 (sums in fp32, one rounding to x's dtype, as
    cuBLAS accumulates). ``silu_and_mul``: as w4_gemv's."""
    M, K = x.shape
    assert 1 <= M <= MAX_GEMV_M, M
    assert weight.shape[1] == K and weight.stride(1) == 1 and weight.dtype in (torch.bfloat16, torch.float16)
    return _row_gemv(x, weight, None, "w16", config, silu_and_mul)
