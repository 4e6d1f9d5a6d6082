"""Varlen causal flash attention over a paged cache with a cached prefix (prefill / chunked prefill)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_attention.common import LOG2E, TL_DTYPES, dot_config, interpreting

# --------------------------------------------------------------------------------------------
# prefill: varlen causal flash attention over a paged cache


@triton.jit
def _fold(acc, m_i, l_i, q, k, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold one tile of keys k [BLOCK_N, BLOCK_D] and values v (q's dtype) into the online softmax
    (log2 domain, fp32) of the rows q; MASKED: keys where ``keep`` [BLOCK_M, BLOCK_N] is false get no weight."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _cache_tile(k_head, v_head, bt_row, n0, end, stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr):
    """Cached K/V of positions [n0, n0 + BLOCK_N) through the block table, in the dot dtype DOT;
    MASKED: positions >= end read as 0. Also returns the positions."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        mask_kv = mask_d[None, :]
    row = pos % PAGE
    k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0).to(DOT)
    v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0).to(DOT)
    return k, v, pos


@triton.jit
def _fresh_tile(k_rows, v_rows, j0, end, stride_kt, stride_vt, mask_d,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr):
    """The chunk's own K/V, rows [j0, j0 + BLOCK_N) of the step's k, v, in DOT; MASKED: rows >= end read
    as 0. Also returns the row indices."""
    j = j0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_kv = (j < end)[:, None] & mask_d[None, :]
    else:
        mask_kv = mask_d[None, :]
    k = tl.load(k_rows + (j * stride_kt)[:, None], mask=mask_kv, other=0.0).to(DOT)
    v = tl.load(v_rows + (j * stride_vt)[:, None], mask=mask_kv, other=0.0).to(DOT)
    return k, v, j


# Per-step values are not specialized on: the block table's width (stride_btb) changes every step, and
# in a mixed step the prefill rows' block table and seq_lens are slices starting at the number of
# decodes, so their 16-byte alignment changes too. (Each specialization is a compile, ~1 s, that
# stalls serving the first time a step meets it: H100 runs at concurrency 512 compiled a prefill
# variant mid-run, which showed as TTFT / TPOT p90 two to three times p50.)
@triton.jit(do_not_specialize=["stride_btb"], do_not_specialize_on_alignment=["bt_ptr", "seq_lens_ptr", "qsl_ptr"])
def _prefill_kernel(
    q_ptr,
    kn_ptr,
    vn_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    qsl_ptr,
    seq_lens_ptr,
    qk_scale,
    qk_scale_cache,
    v_scale,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_knt,
    stride_knh,
    stride_knd,
    stride_vnt,
    stride_vnh,
    stride_vnd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_btb,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CACHE_DOT: tl.constexpr,
    CACHE_PREC: tl.constexpr,
    KV_FP8: tl.constexpr = False,
):
    """Program (tile, kv head, b). The tile's BLOCK_M rows are (query, head-of-group) pairs,
    row r = query r // G, head r % G, so the G heads sharing a KV head share every K/V tile.
    Keys [0, ctx) come from the cache with dots in CACHE_DOT (an FP8 cache: its e4m3 values, exact in
    fp16, with k_scale in qk_scale_cache and v_scale applied to the prefix's sum), the chunk's own keys
    from kn / vn with dots in DOT (q's dtype)."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (most causal work) tiles first
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_start = q_start.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // G
    heads = hk * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = qi < q_len
    tok = q_start + qi
    mask_q = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    # the chunk's queries [first_q, last_q]; a tile past q_len does nothing
    first_q = (tile * BLOCK_M) // G
    last_q = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    busy = first_q < q_len
    ctx = tl.where(busy, seq_len - q_len, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # the cached prefix [0, ctx): visible to every query of the chunk; only its last tile is partial
    if KV_FP8 and tl.float16 == CACHE_DOT:  # bf16 q -> fp16: saturate (|q| > 65504 would be inf)
        qc = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(CACHE_DOT)
    else:
        qc = q.to(CACHE_DOT)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = k_ptr + hk * stride_kh + offs_d[None, :] * stride_kd
    v_head = v_ptr + hk * stride_vh + offs_d[None, :] * stride_vd
    full = (ctx // BLOCK_N) * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        k, v, pos = _cache_tile(k_head, v_head, bt_row, n0, ctx, stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
                                PAGE, BLOCK_N, False, CACHE_DOT)
        acc, m_i, l_i = _fold(acc, m_i, l_i, qc, k, v, qk_scale_cache, None, False, CACHE_PREC)
    for n0 in range(full, ctx, BLOCK_N):
        k, v, pos = _cache_tile(k_head, v_head, bt_row, n0, ctx, stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
                                PAGE, BLOCK_N, True, CACHE_DOT)
        acc, m_i, l_i = _fold(acc, m_i, l_i, qc, k, v, qk_scale_cache, (pos < ctx)[None, :], True, CACHE_PREC)
    if KV_FP8:
        acc = acc * v_scale

    # the chunk's own tokens, rows [0, last_q] of kn / vn: tiles [0, lo) are below every query of the
    # tile (no mask), [lo, hi) need the causal mask
    qf = q.to(DOT)
    kn_rows = kn_ptr + q_start * stride_knt + hk * stride_knh + offs_d[None, :] * stride_knd
    vn_rows = vn_ptr + q_start * stride_vnt + hk * stride_vnh + offs_d[None, :] * stride_vnd
    hi = tl.where(busy, last_q + 1, 0)
    lo = tl.minimum((first_q // BLOCK_N) * BLOCK_N, hi)
    for j0 in range(0, lo, BLOCK_N):
        k, v, j = _fresh_tile(kn_rows, vn_rows, j0, hi, stride_knt, stride_vnt, mask_d, BLOCK_N, False, DOT)
        acc, m_i, l_i = _fold(acc, m_i, l_i, qf, k, v, qk_scale, None, False, DOT_PREC)
    for j0 in range(lo, hi, BLOCK_N):
        k, v, j = _fresh_tile(kn_rows, vn_rows, j0, hi, stride_knt, stride_vnt, mask_d, BLOCK_N, True, DOT)
        keep = (j[None, :] <= qi[:, None]) & (j < hi)[None, :]
        acc, m_i, l_i = _fold(acc, m_i, l_i, qf, k, v, qk_scale, keep, True, DOT_PREC)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_q,
    )


def _prefill_config(block_d: int, elem_size: int, interpreting: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head size and the widest dot dtype.

    Checked by compiling for sm_90a: the 16-bit configs use wgmma and do not spill (D 64: 125,
    D 128: 190, D 256: 186 registers/thread). fp32 caches use IEEE fp32 FMA dots (exact
    parity with the fp32 reference; a debugging mode, not a fast path) on small tiles that fit
    the register file.
    """
    if interpreting:
        return 32, 32, 4, 1
    if elem_size >= 4:
        return 16, 16, 4, 1
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def cache_dot_dtype(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype the dots over cached K/V run in: the cache's own, or for an FP8 (e4m3) cache fp16 when q
    is 16-bit (e4m3 values are exact in fp16 and one packed instruction converts two of them on sm_89+;
    bf16 would take a second, scalar conversion per element) and fp32 for an fp32 q."""
    if cache_dtype == torch.float8_e4m3fn:
        return torch.float32 if q_dtype == torch.float32 else torch.float16
    return cache_dtype


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cache_dot: torch.dtype | None = None,
) -> torch.Tensor:
    """Varlen causal attention of flat queries q [T, Hq, D] over the chunks' own k, v [T, Hkv, D] and
    their cached prefixes -> [T, Hq, D] (q's dtype).

    Sequence b's queries (rows query_start_loc[b]..[b+1]) sit at positions ctx_b .. seq_lens[b] - 1,
    ctx_b = seq_lens[b] - q_len_b. They attend causally to the chunk's own tokens through k, v (the
    step's rotated K/V in q's dtype, as rope_and_cache returns them; what the cache holds for those
    positions is never read) and to positions [0, ctx_b) through the cache. A float8_e4m3fn cache is
    read as its values times ``k_scale`` / ``v_scale``: only the prefix is dequantized, so a prompt
    prefilled in one step attends exactly as over a full-precision cache.

    Grid (cdiv(max_query_len * G, BLOCK_M), Hkv, B), no host sync: programs past their sequence's q_len
    do no work. Each program owns BLOCK_M (query, head) rows of one GQA group and streams K/V tiles of
    BLOCK_N tokens with an fp32 online softmax: first the prefix through the block table (no mask but
    on its last partial tile), then the chunk's rows of k, v (unmasked below the tile's first query,
    then the causal diagonal). The prefix's dots run in :func:`cache_dot_dtype` (``cache_dot``
    overrides it: benchmarks), the chunk's in q's dtype. ``max_query_len`` must be >= every q_len;
    ``max_seq_len`` is accepted for API symmetry. ``block_m``/``block_n`` override the heuristics
    (tests, tuning).
    """
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert k.shape == (T, Hkv, D) and v.shape == k.shape and k.dtype == q.dtype and v.dtype == q.dtype
    B = seq_lens.shape[0]
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    block_d = triton.next_power_of_2(D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    cache_dot = cache_dot or cache_dot_dtype(q.dtype, k_cache.dtype)
    esize = max(q.element_size(), torch.tensor([], dtype=cache_dot).element_size())
    bm, bn, warps, stages = _prefill_config(block_d, esize, interpreting(q))
    bm = block_m or bm
    bn = block_n or bn
    upcast, prec = dot_config(q, q.dtype)
    cache_upcast, cache_prec = dot_config(q, cache_dot)
    grid = (triton.cdiv(int(max_query_len) * G, bm), Hkv, B)
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, scale * LOG2E * (float(k_scale) if fp8 else 1.0), float(v_scale),
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_tables.stride(0),
        G=G, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_M=bm, BLOCK_N=bn,
        DOT=tl.float32 if upcast else TL_DTYPES[q.dtype], DOT_PREC=prec,
        CACHE_DOT=tl.float32 if cache_upcast else TL_DTYPES[cache_dot], CACHE_PREC=cache_prec, KV_FP8=fp8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
