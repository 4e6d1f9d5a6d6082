"""W4 (int4 group-wise) decode GEMV kernels: on CUDA cores and on tensor cores (swap-AB). Launched by
rtllm.kernels.triton_quant_gemv.w4_gemv (which holds the semantics, split-K and PDL notes); the epilogue
is rtllm.kernels.triton_gemv_epilogue's.

The CUDA-core kernel: the word ``w`` (8 nibbles, K-major) is not shifted per nibble.
``(w & (0xF << s)) | magic`` places nibble s/4 in the mantissa of the fp32 ``2^(23-s) + q`` (exact), and
one FADD of ``-(2^(23-s) + 8)`` gives ``q - 8`` exactly: LOP3 + FADD + FFMA per weight. Nibbles 5..7 do
not fit under the exponent and are read from ``w >> 16`` (one shift per word). ``magic`` and the 16 are
kernel arguments so that the compiler keeps them in registers and cannot fold mask and shift into
bit-field extracts. The group's scale and zero apply once per group and column:
``sum_k x_k ((q - 8) s + z) = s sum_k x_k (q - 8) + z sum_k x_k``.

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
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_gemv_epilogue import finish_row, gemv_columns, reduce_splits

# fp32 bits of 2^23 (nibble s/4 of a word uses MAGIC - (s << 23), i.e. 2^(23 - s))
W4_MAGIC = 0x4B000000


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
def w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, HALF, NUM_T, T_PER_SPLIT, n_splits, MAGIC, SH16,
    stride_xm, stride_qk, stride_sg, stride_om,
    GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, PARTIAL: tl.constexpr, REDUCE: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), n_splits). Program (n tile, split) reduces K tiles
    [split * T_PER_SPLIT, ...) (of BLOCK_K; a split holds whole groups) for M (1..4) rows. With
    PREFETCH the next tile's words are loaded before the current one is decoded. PDL: triton_quant_gemv's docstring."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    R: tl.constexpr = BLOCK_K // 8  # packed words per column per tile
    TPG: tl.constexpr = GROUP // BLOCK_K  # tiles per group
    offs_n, mask_n, offs_o, mask_o = gemv_columns(pid_n, N, HALF, BLOCK_N, GATED)
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
    finish_row(acc0, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 1:
        finish_row(acc1, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 2:
        finish_row(acc2, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    if M > 3:
        finish_row(acc3, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M, PARTIAL, GATED)
    reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
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
def w4_tc_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, HALF, NUM_T, T_PER_SPLIT, n_splits,
    stride_xm, stride_qk, stride_sg, stride_om,
    GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    PARTIAL: tl.constexpr, REDUCE: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The W4 GEMV on tensor cores, weights as the MMA's A operand ([BLOCK_N, BLOCK_K] per tile, decoded
    in registers by _w4_operand), x^T as B ([BLOCK_K, 16], rows beyond M zero). Grid, splits and
    epilogue as w4_gemv_kernel's; a group's MMA sums (fp32) take its scale once, its zero as
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
    offs_n, mask_n, offs_o, mask_o = gemv_columns(pid_n, N, HALF, BLOCK_N, GATED)
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
    finish_row(_w4_tc_col(acc, 0) + zs0, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
            PARTIAL, GATED)
    if M > 1:
        finish_row(_w4_tc_col(acc, 1) + zs1, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    if M > 2:
        finish_row(_w4_tc_col(acc, 2) + zs2, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    if M > 3:
        finish_row(_w4_tc_col(acc, 3) + zs3, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
                M, PARTIAL, GATED)
    reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
                   REDUCE, GATED)
