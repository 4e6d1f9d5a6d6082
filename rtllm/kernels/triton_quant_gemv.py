"""GEMV-shaped weight-only kernels for decode (1..4 activation rows; rtllm.kernels.quant_gemm uses them up
to its W4_GEMV_MAX_M / W8_GEMV_MAX_M): W4 (int4 group-wise) and W8 (int8 or e4m3 bytes, per-channel
scales), on CUDA cores; W4 also on tensor cores. The W4 kernels are in rtllm.kernels.triton_w4_gemv, the
epilogue they share (columns, SiLU-and-mul, split-K) in rtllm.kernels.triton_gemv_epilogue; the row-
major W8 / W16 kernel, the workspace and the entry points here. Dense 16-bit weights run the W8 loop
with a conversion for the decode (``w16_gemv``; rtllm.kernels.gemm uses it up to DENSE_GEMV_MAX_M).

Semantics are those of :mod:`rtllm.kernels.quant_gemm` (same layouts, ``y = x @ W^T``), computed
exactly in fp32 except for the sums: each weight code is decoded exactly, multiplied by the
activation in fp32, summed in fp32 and rounded once to x's dtype. (The tensor-core kernels round
W to x's 16-bit dtype first; these never do, so they are at least as close to the exact product.)

Why not ``tl.dot``: at M = 1 a tensor-core tile pads M to 16 and the dequantized tile must be
moved into the MMA operand layout through shared memory; a GEMV needs neither. Each program owns
BLOCK_N output features and a range of K (split-K when N alone gives too few programs), loads the
packed weights with 16-byte loads that are contiguous across the warp, decodes them in registers
and keeps per-thread fp32 partial sums; the reduction over K happens once at the end. (Folding each
16-byte load's products into one partial, BLOCK_K / 16 partials a row instead of BLOCK_K, halved the
registers but measured slower end to end on an H100: FP8 Llama TPOT 3.64 against 3.29 ms, the MoE's
expert GEMVs likewise 3.048 against 3.005 ms; docs/PERF.md.)

Decoding costs about 3 instructions per weight (sm_90 SASS of the W4 loop: ~4.3 per int4 weight with
the activation loads, so on an H100 its ALU and memory times are of the same size; W8 / FP8 decode
a byte for about the same and are memory-bound; figures in docs/PERF.md):

- W4: see rtllm.kernels.triton_w4_gemv (a word decoded without a shift per nibble).
- W8 int8: ``q + 0x4B000080`` (integer add on the sign-extended byte) is the fp32 ``2^23 + 128 + q``;
  an FADD gives q exactly. e4m3: Hopper's paired e4m3 -> f16 conversion (exact), then f16 -> f32; rows
  of whole 4-byte words are read as int32 words and each decoded by two conversions of its halves
  (rtllm.kernels.triton_fp8.e4m3_words_to_f16): Triton's conversion of a byte tile first regroups the
  bytes into pairs (sm_90 SASS of the 16 x 512 prefetching loop: 374 instructions, 90 of them PRMT,
  against 235 read as words), which kept the prefetching tiles from winning; read as words they win on
  qkv, o and down (H100: Llama-3.1-8B FP8 TPOT 3.29 -> 3.12 ms with the retuned tiles).
  The per-channel scale multiplies the finished sum.

W4 also runs on tensor cores (swap-AB, ``GemvConfig.tc``): rtllm.kernels.triton_w4_gemv.

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

from rtllm.kernels.device_buffers import device_buffer
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_attention.common import interpreting, pdl_enabled, sm_count
from rtllm.kernels.triton_fp8 import e4m3_words_to_f16, readable_as_words
from rtllm.kernels.triton_gemv_epilogue import finish_row, gemv_columns, reduce_splits
from rtllm.kernels.triton_quant_gemv_config import TUNED, GemvConfig, gemv_config
from rtllm.kernels.triton_round import COMPILED
from rtllm.kernels.triton_w4_gemv import W4_MAGIC, w4_gemv_kernel, w4_tc_kernel

__all__ = ["TUNED", "GemvConfig", "gemv_config", "w4_gemv", "w8_gemv", "w16_gemv"]

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
# W8 (int8 or e4m3 bytes)


@triton.jit
def _w8_decode(q, MAGIC, FP8: tl.constexpr, W16: tl.constexpr, WORDS: tl.constexpr):
    if W16:  # a 16-bit weight: exact in fp32
        w = q.to(tl.float32)
    elif WORDS:  # int32 words of four e4m3 codes: Hopper's paired conversion on each half (compiled)
        w = e4m3_words_to_f16(q, COMPILED).to(tl.float32)
    elif FP8:
        w = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        w = (q.to(tl.int32) + MAGIC).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
    return w


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
    W16: tl.constexpr, WORDS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), n_splits); qw [N, K] bytes (int8, or e4m3 read as uint8), or with W16
    the 16-bit weight itself (no scales), or with WORDS e4m3 codes read as int32 words [N, K / 4] (K a
    multiple of 4; stride_qn in words). K range [split * K_PER_SPLIT, ...), K_PER_SPLIT a multiple of
    BLOCK_K. PDL: triton_quant_gemv's docstring."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    offs_n, mask_n, offs_o, mask_o = gemv_columns(pid_n, N, HALF, BLOCK_N, GATED)
    KW: tl.constexpr = 4 if WORDS else 1  # weights a loaded element
    cols = tl.arange(0, BLOCK_K)
    wcols = tl.arange(0, BLOCK_K // KW)
    t0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    q_next = _w8_load(qw_ptr, offs_n, mask_n, k_lo // KW + wcols, k_hi // KW, stride_qn, EVEN_K)
    if PDL:
        gdc_wait()
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            q = q_next
            k_next = tl.where(k0 + BLOCK_K < k_hi, k0 + BLOCK_K, k0)  # the last tile loads itself again
            q_next = _w8_load(qw_ptr, offs_n, mask_n, k_next // KW + wcols, k_hi // KW, stride_qn, EVEN_K)
        else:
            q = _w8_load(qw_ptr, offs_n, mask_n, k0 // KW + wcols, k_hi // KW, stride_qn, EVEN_K)
        w = _w8_decode(q, MAGIC, FP8, W16, WORDS)
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
    finish_row(tl.sum(t0, axis=1) * sc, 0, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
            PARTIAL, GATED)
    if M > 1:
        finish_row(tl.sum(t1, axis=1) * sc, 1, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    if M > 2:
        finish_row(tl.sum(t2, axis=1) * sc, 2, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    if M > 3:
        finish_row(tl.sum(t3, axis=1) * sc, 3, out_ptr, ws_ptr, offs_n, mask_n, offs_o, mask_o, pid_k, N, stride_om, M,
                PARTIAL, GATED)
    reduce_splits(out_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, offs_o, mask_o, pid_n, N, stride_om, n_splits, M,
                   REDUCE, GATED)


# --------------------------------------------------------------------------------------------
# workspace


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fp32 partials, int32 zeroed counters) for a split-K launch, or None when this launch cannot
    use them (too large, or a CUDA-graph capture before the workspace exists: rtllm.kernels.device_buffers)."""
    ws = device_buffer("gemv_split_k", device, lambda: (
        torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
        torch.zeros(WORKSPACE_TILES, dtype=torch.int32, device=device)))
    if ws is None or floats > ws[0].numel() or tiles > ws[1].numel():
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
    """Whether a W4 launch runs w4_tc_kernel: asked for by the configuration, 16-bit x (the MMA's
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
        w4_tc_kernel[(n_tiles, splits)](
            x, qweight, scales, zeros, out, ws, cnt, N, half, num_g * tpg, g_per * tpg, splits,
            x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, ASM=not interpreting(x), PARTIAL=partial,
            REDUCE=reduce, GATED=silu_and_mul, PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.stages,
            launch_pdl=pdl,
        )  # fmt: skip
    else:
        w4_gemv_kernel[(n_tiles, splits)](
            x, qweight, scales, zeros, out, ws, cnt, N, half, num_g * tpg, g_per * tpg,
            splits, W4_MAGIC, 16, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, PREFETCH=cfg.prefetch, PARTIAL=partial,
            REDUCE=reduce, GATED=silu_and_mul, PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
        )  # fmt: skip
    return _result(out, partial, reduce, x.dtype, silu_and_mul)


def _e4m3_words(q: torch.Tensor, kind: str, block_k: int) -> bool:
    """Whether an FP8 launch reads its codes as int32 words (four a load element, decoded in pairs by the
    hardware conversion): rows of whole words, 4-byte aligned, and K tiles of whole words."""
    return kind == "fp8" and readable_as_words(q) and block_k % 4 == 0


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
    words = _e4m3_words(q, kind, bk)
    qw = q.view(torch.int32) if words else q
    _w8_gemv_kernel[(n_tiles, splits)](
        x, qw, q if w16 else scales, out, ws, cnt, N, N // 2 if silu_and_mul else 0, K, t_per * bk, splits,
        _W8_MAGIC, x.stride(0), qw.stride(0), out.stride(0),
        M=M, BLOCK_N=cfg.block_n, BLOCK_K=bk, PREFETCH=cfg.prefetch, PARTIAL=partial, REDUCE=reduce,
        FP8=kind == "fp8", EVEN_K=K % bk == 0, GATED=silu_and_mul, W16=w16, WORDS=words, PDL=pdl,
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
