"""The epilogue the decode GEMV kernels share (rtllm.kernels.triton_quant_gemv, triton_w4_gemv): a
program's output columns (two half tiles of gate and up features for the fused SiLU-and-mul), the
store of a row's fp32 sums (with SiLU-and-mul), and split-K through the self-reducing workspace (the
last program of an N tile sums the partials in split order). triton_quant_gemv's docstring says why."""

from __future__ import annotations

import triton
import triton.language as tl

from rtllm.kernels.triton_activation import silu_mul


@triton.jit
def gemv_columns(pid_n, N, HALF, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
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
def store_row(acc, m, out_ptr, offs_o, mask_o, stride_om, GATED: tl.constexpr):
    """Row m of the output from its fp32 sums over the tile's columns; GATED: silu(gate) * up, gate
    and up rounded to the output dtype first (the values the unfused GEMV would store)."""
    DT: tl.constexpr = out_ptr.dtype.element_ty
    if GATED:
        g, u = tl.split(tl.permute(tl.reshape(acc, (2, acc.shape[0] // 2)), (1, 0)))
        acc = silu_mul(g.to(DT).to(tl.float32), u.to(DT).to(tl.float32), DT)
    tl.store(out_ptr + m * stride_om + offs_o, acc.to(DT), mask=mask_o)


@triton.jit
def finish_row(acc, m, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om,
            M: tl.constexpr, PARTIAL: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
    """Row m's result, or with PARTIAL its fp32 partial (ws [splits, M, N], split pid_k)."""
    if PARTIAL:
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, acc, mask=mask_n)
    else:
        store_row(acc, m, out_ptr, offs_o, mask_o, stride_om, GATED)


@triton.jit
def reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits,
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
                store_row(tot, m, out_ptr, offs_o, mask_o, stride_om, GATED)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
