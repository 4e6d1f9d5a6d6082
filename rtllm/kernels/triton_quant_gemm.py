"""Triton weight-only GEMMs for small batches (W4A16, W8A16) and the W4 dequantize kernel.

Semantics and layouts are those of :mod:`rtllm.kernels.quant_gemm` (the references):
``y = x @ W^T`` with W dequantized in fp32, rounded to x's 16-bit dtype for the tensor-core dot,
fp32 accumulation, one rounding of the output.

Decode (M <= 16) is bound by reading the weight: each program owns BLOCK_N output columns and
one slice of K (split-K when N alone gives too few programs to fill the SMs), streams packed
weight tiles through registers, dequantizes them and runs ``tl.dot`` against a BLOCK_M = 16 row
tile of x (rows past M are masked). Split-K partials land in an fp32 buffer that one sum reduces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_attention.common import interpreting, sm_count


def _split_k(n_tiles: int, k_tiles: int, sms: int) -> int:
    """Split K so that about two waves of programs run, keeping >= 4 K tiles per split."""
    want = max(1, (2 * sms) // max(n_tiles, 1))
    return max(1, min(want, k_tiles // 4 or 1))


def _gemm_config(M: int, N: int, K: int, group: int, interpreting: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    bm = 16
    if interpreting:
        return bm, 32, min(32, group), 4, 1
    bk = min(128, group)
    bn = 64 if N <= 8192 else 128
    return bm, bn, bk, 4, 4


# --------------------------------------------------------------------------------------------
# W4A16


@triton.jit(do_not_specialize=["M", "stride_os"])  # the row count changes every step: no recompile per class
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :],
                     mask=(offs_w < k_hi // 8)[:, None] & mask_n[None, :], other=0)
        q = (qw[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)
        # a tile never straddles groups: GROUP and BLOCK_K are powers of two, BLOCK_K <= GROUP
        g = k0 // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (q - 8.0) * s[None, :] + z[None, :]
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    o = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      *, block_n: int | None = None, block_k: int | None = None,
                      split_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T for the W4 layout (qweight int32 [K/8, N], scales/zeros [K/g, N]).

    Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, 16)). Group g must be a power of two >= 32 (K a
    multiple of it); the overrides are for tests and tuning."""
    M, K = x.shape
    N = qweight.shape[1]
    assert qweight.shape[0] * 8 == K and scales.shape == zeros.shape and scales.shape[1] == N
    group = K // scales.shape[0]
    assert group * scales.shape[0] == K and group & (group - 1) == 0 and group >= 16, group
    x = x if x.stride(-1) == 1 else x.contiguous()
    interp = interpreting(x)
    bm, bn, bk, warps, stages = _gemm_config(M, N, K, group, interp)
    bn, bk = block_n or bn, block_k or bk
    assert bk <= group and bk % 8 == 0
    n_tiles, k_tiles = triton.cdiv(N, bn), triton.cdiv(K, bk)
    split = split_k or _split_k(n_tiles, k_tiles, sm_count(x))
    k_per_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(K, k_per_split)
    out = torch.empty((split, M, N), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if M == 0:
        return out.sum(0).to(x.dtype)
    grid = (n_tiles, split, triton.cdiv(M, bm))
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, out, M, N, K, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UPCAST=interp or x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


@triton.jit(do_not_specialize=["K_PER_SPLIT"])
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K, K_PER_SPLIT,
    stride_qk, stride_sg, stride_os,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One activation row (decode at batch 1): program (n tile, k split) reduces its K range without
    tensor cores. Per (BLOCK_K tile, column): sum_k x_k * ((q - 8) * s + z)
    = s * sum_k x_k (q - 8) + z * sum_k x_k, so the group's scale and zero apply once per tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    i8 = tl.arange(0, BLOCK_K // 8)
    j8 = tl.arange(0, 8)
    shifts = j8 * 4
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + i8[:, None] * 8 + j8[None, :]  # [BLOCK_K / 8, 8]: word i, nibble j holds k = 8 i + j
        xk = tl.load(x_ptr + kk, mask=kk < k_hi, other=0.0).to(tl.float32)
        rows = k0 // 8 + i8
        qw = tl.load(qw_ptr + rows[:, None] * stride_qk + offs_n[None, :],
                     mask=(rows < k_hi // 8)[:, None] & mask_n[None, :], other=0)  # [BLOCK_K / 8, BLOCK_N]
        q = ((qw[:, None, :] >> shifts[None, :, None]) & 0xF).to(tl.float32) - 8.0
        part = tl.sum(tl.sum(q * xk[:, :, None], axis=1), axis=0)  # [BLOCK_N]
        xsum = tl.sum(tl.sum(xk, axis=1), axis=0)
        g = k0 // GROUP  # BLOCK_K <= GROUP and both powers of two: a tile lies in one group
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s + xsum * z
    tl.store(out_ptr + pid_k * stride_os + offs_n, acc, mask=mask_n)


def w4_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   *, block_n: int | None = None, block_k: int | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W^T for the W4 layout, on CUDA cores (fp32 sums, one rounding to x's
    dtype). Grid (cdiv(N, BLOCK_N), SPLIT_K), about two waves of programs."""
    M, K = x.shape
    N = qweight.shape[1]
    assert M == 1 and qweight.shape[0] * 8 == K and scales.shape == zeros.shape and scales.shape[1] == N
    group = K // scales.shape[0]
    assert group * scales.shape[0] == K and group & (group - 1) == 0 and group >= 16, group
    x = x.contiguous()
    interp = interpreting(x)
    # H100 grid search (scripts/quant_kernel_tune.py, group 128): qkv 6144x4096 16.6 us, o 4096x4096
    # 14.9, gate_up 28672x4096 45.7, down 4096x14336 26.3 (bf16 F.linear: 22.6 / 13.4 / 85.6 / 46.8)
    bn = block_n or (32 if interp else (256 if N >= 16384 else 128))
    bk = min(block_k or (32 if interp else 128), group)
    assert bk % 8 == 0
    n_tiles, k_tiles = triton.cdiv(N, bn), triton.cdiv(K, bk)
    split = split_k or (max(1, min(2 * sm_count(x) // n_tiles, k_tiles)) if interp else (16 if K > 8192 else 8))
    k_per_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(K, k_per_split)
    out = torch.empty((split, N), dtype=torch.float32, device=x.device)
    _w4_gemv_kernel[(n_tiles, split)](
        x, qweight, scales, zeros, out, N, K, k_per_split, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip
    y = out[0] if split == 1 else out.sum(0)
    return y.to(x.dtype).view(1, N)


@triton.jit
def _w4_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, K, N, stride_qk, stride_sg, stride_ok,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_w = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :],
                 mask=(offs_w < K // 8)[:, None] & mask_n[None, :], other=0)
    shifts = tl.arange(0, 8) * 4
    q = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    sp = offs_k[:, None] // GROUP * stride_sg + offs_n[None, :]
    s = tl.load(s_ptr + sp, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sp, mask=mask, other=0.0).to(tl.float32)
    w = (q - 8.0) * s + z
    tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_w4_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W^T [K, N] in ``dtype`` from the W4 layout. Grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group = K // scales.shape[0]
    out = torch.empty((K, N), dtype=dtype, device=qweight.device)
    bk, bn = (32, 32) if interpreting(qweight) else (64, 128)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _w4_dequant_kernel[grid](qweight, scales, zeros, out, K, N, qweight.stride(0), scales.stride(0), out.stride(0),
                             GROUP=group, BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# W8A16


@triton.jit(do_not_specialize=["M", "stride_os"])  # the row count changes every step: no recompile per class
def _w8a16_kernel(
    x_ptr, qw_ptr, s_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_qn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, APPLY_SCALE: tl.constexpr, FP8_BITS: tl.constexpr = False, M_MAJOR: tl.constexpr = False,
):  # fmt: skip
    if M_MAJOR:  # the row tiles of one weight tile run side by side: the tile is read once from memory
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(2)
    else:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(2)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(qw_ptr + offs_n[None, :] * stride_qn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N]
        if FP8_BITS:  # e4m3 bytes: sign and 7 bits into an fp16 = the value * 2^-8 (exact, subnormals too)
            v = q.to(tl.int32)
            h = (((v & 0x80) << 8) | ((v & 0x7F) << 7)).to(tl.int16)
            q = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, q.to(x.dtype))  # int8 |q| <= 127 and e4m3 (3 mantissa bits): exact in bf16
    if APPLY_SCALE:  # one split: scale before the single rounding
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    o = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# M > 16 (prefill, large decode batches): tensor-core tiles over M too, the byte -> 16-bit
# conversion in registers, the scale in the epilogue; split-K only where the tiles alone would leave
# SMs idle. (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by rows, the best of scripts/w8_gemm_bench.py's
# candidates on an H100 at the Llama-3.1-8B shapes (M 64 / 512 / 2048; docs/PERF.md).
W8_LARGE_M = ((64, (64, 128, 64, 4, 4)), (None, (128, 128, 64, 4, 4)))


def _w8_large_m_config(M: int, interp: bool) -> tuple[int, int, int, int, int]:
    if interp:
        return 32, 32, 32, 4, 1
    for rows, cfg in W8_LARGE_M:
        if rows is None or rows >= M:
            return cfg
    raise AssertionError  # pragma: no cover - the table ends with None


def w8a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *,
                      block_n: int | None = None, block_k: int | None = None,
                      split_k: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """y [M, N] = (x [M, K] @ q^T) * scales for qweight int8 or float8_e4m3fn [N, K], scales [N]
    (e4m3 weights are read as bytes and decoded in the kernel: the weight-only FP8 path).

    M <= 16: grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, 16)); split-K partials are summed in fp32 and
    scaled once. M > 16: grid (cdiv(M, BLOCK_M), 1, cdiv(N, BLOCK_N)), the M tiles of a weight tile
    adjacent in launch order (they run together and read it once); the overrides are for tests and
    tuning. Unlike converting q to x's dtype for a dense GEMM, this never materializes the 16-bit
    weight (the INT8 LM head at a batch of 512: ~1.7 ms of conversion a step, docs/PERF.md)."""
    M, K = x.shape
    N = qweight.shape[0]
    assert qweight.shape[1] == K and scales.shape == (N,)
    x = x if x.stride(-1) == 1 else x.contiguous()
    fp8 = qweight.dtype == torch.float8_e4m3fn
    if fp8:
        qweight = qweight.view(torch.uint8)
    interp = interpreting(x)
    bm, bn, bk, warps, stages = _gemm_config(M, N, K, 128, interp)
    m_major = M > 16
    if m_major:
        bm, bn, bk, warps, stages = _w8_large_m_config(M, interp)
        bm = block_m or bm
        if split_k is None:  # e.g. down_proj (N 4096, K 14336) at 64 rows: 32 tiles for 132 SMs
            split_k = _split_k(triton.cdiv(N, block_n or bn) * triton.cdiv(M, bm), triton.cdiv(K, block_k or bk),
                               sm_count(x))
    elif not interp and block_n is None and block_k is None and split_k is None:
        # decode: narrow N tiles and long K tiles, no split unless K is long (scripts/quant_kernel_tune.py,
        # H100, M = 1: qkv 6144x4096 20.5 -> 15.3 us, o 4096x4096 17.1 -> 13.5, gate_up 48.8 -> 46.8)
        bn, bk, split_k = (32, 128, 1) if K <= 8192 else (64, 128, 4)
    bn, bk = block_n or bn, block_k or bk
    n_tiles, k_tiles = triton.cdiv(N, bn), triton.cdiv(K, bk)
    split = split_k or _split_k(n_tiles, k_tiles, sm_count(x))
    k_per_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(K, k_per_split)
    out = torch.empty((split, M, N), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if M > 0:
        m_tiles = triton.cdiv(M, bm)
        grid = (m_tiles, split, n_tiles) if m_major else (n_tiles, split, m_tiles)
        _w8a16_kernel[grid](
            x, qweight, scales, out, M, N, K, k_per_split,
            x.stride(0), qweight.stride(0), out.stride(0), out.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=interp or x.dtype == torch.float32,
            APPLY_SCALE=split == 1, FP8_BITS=fp8, M_MAJOR=m_major, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if split == 1:
        return out[0]
    return (out.sum(0) * scales.float()).to(x.dtype)
