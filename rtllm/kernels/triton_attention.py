"""Triton paged attention: flash-decoding, varlen causal prefill, and KV-cache writes.

Layouts and semantics are those of the torch references in :mod:`rtllm.kernels.attention`:

- ``k_cache``, ``v_cache``: [num_blocks, block_size, Hkv, D] (bf16, fp16 or fp32; any strides).
  Position p of sequence b lives in block ``block_tables[b, p // block_size]`` at row
  ``p % block_size``. Block ids need not be contiguous or ordered; only the entries covering
  positions < seq_lens[b] are ever read.
- ``q``: decode [B, Hq, D]; prefill flat [T, Hq, D] with ``query_start_loc`` [B+1] int32.
  ``seq_lens`` [B] int32 counts cached prefix + new tokens, so query j of sequence b sits at
  position ``seq_lens[b] - q_len_b + j`` and attends to positions <= that.
- GQA: query head h reads KV head ``h // (Hq // Hkv)`` (as ``enable_gqa`` / repeat_interleave).
- Softmax statistics and accumulators are fp32; QK^T and PV run on tensor cores in the cache
  dtype (fp32 caches use IEEE fp32 dots, not TF32). Outputs have q's dtype.
- A sequence with seq_len 0 (a padding row) gets an all-zero output instead of NaN.

No kernel here syncs with the host: grids come from shapes and the caller's max lengths, so
they can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_rope import rope_launch

_LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------
# helpers


def _interpreting(t: torch.Tensor) -> bool:
    """CPU tensors can only reach a Triton kernel under TRITON_INTERPRET=1."""
    return t.device.type != "cuda"


def _dot_config(t: torch.Tensor, cache_dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) for a kernel reading a cache of ``cache_dtype``.

    The interpreter gets bf16 arithmetic wrong, so there bf16 tiles are upcast to fp32 right
    after loading. fp32 caches use IEEE dots so results match the fp32 reference.
    """
    upcast = _interpreting(t) and cache_dtype == torch.bfloat16
    prec = "ieee" if (cache_dtype == torch.float32 or upcast) else "tf32"
    return upcast, prec


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 132  # H100: the target machine; only shapes the split heuristic on CPU


# --------------------------------------------------------------------------------------------
# reshape_and_cache


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = slot >= 0  # negative slot: padding token, not cached
    slot = tl.maximum(slot, 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < HKV)[:, None] & (offs_d < HEAD_DIM)[None, :] & ok
    blk = slot // PAGE
    row = slot % PAGE
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    kc = (
        kc_ptr
        + blk * stride_kcb
        + row * stride_kcs
        + offs_h[:, None] * stride_kch
        + offs_d[None, :] * stride_kcd
    )
    vc = (
        vc_ptr
        + blk * stride_vcb
        + row * stride_vcs
        + offs_h[:, None] * stride_vch
        + offs_d[None, :] * stride_vcd
    )
    tl.store(kc, k.to(tl.float32), mask=mask)
    tl.store(vc, v.to(tl.float32), mask=mask)


def reshape_and_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hkv, D] into cache slots ``slot_mapping`` [T] (int64; a negative slot is
    skipped). Caches: [num_blocks, block_size, Hkv, D]; values are cast to the cache dtype.
    Grid: one program per token (all its heads)."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape and slot_mapping.shape[0] == T
    assert k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape
    if T == 0:
        return
    bh, bd = triton.next_power_of_2(Hkv), triton.next_power_of_2(D)
    _reshape_and_cache_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        HKV=Hkv, HEAD_DIM=D, BLOCK_H=bh, BLOCK_D=bd, PAGE=k_cache.shape[1],
        num_warps=4 if bh * bd >= 2048 else 1,
    )  # fmt: skip


def rope_and_cache_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: rotate q [T, Hq, D] and k [T, Hkv, D] (neox RoPE, see :mod:`triton_rope`),
    write rotated k and v [T, Hkv, D] into slots ``slot_mapping`` of the paged caches, and
    return new (q_rot, k_rot). Grid: one program per token."""
    assert v.shape == k.shape and k_cache.shape[2:] == k.shape[1:] and v_cache.shape == k_cache.shape
    return rope_launch(positions, q, k, cos_sin_cache, v, k_cache, v_cache, slot_mapping)


# --------------------------------------------------------------------------------------------
# decode: flash-decoding over a paged cache


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    qk_scale,
    split_tokens,
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_od,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (b, kv head, split): the G query heads of the group against tokens
    [split * split_tokens, min(+split_tokens, seq_len)). Writes (max, sum, unnormalized out) in
    the log2 domain, or the final output when there is one split."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + b)
    start = s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    heads = hk * G + offs_g
    mask_q = mask_g[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = k_ptr + hk * stride_kh + offs_d[None, :] * stride_kd
    v_head = v_ptr + hk * stride_vh + offs_d[None, :] * stride_vd
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
        row = pos % PAGE
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if ONE_SPLIT:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=mask_q,
        )
    else:
        # partials: m/l [B, Hq, S], acc [B, Hq, S, D], contiguous
        part = (b.to(tl.int64) * (num_kv_heads * G) + heads) * num_splits + s
        tl.store(m_ptr + part, m_i, mask=mask_g)
        tl.store(l_ptr + part, l_i, mask=mask_g)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_q)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    seq_lens_ptr,
    split_tokens,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (b, q head): merge the splits that hold tokens of sequence b."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_valid = tl.minimum((seq_len + split_tokens - 1) // split_tokens, num_splits)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_valid
    mask_d = offs_d < HEAD_DIM
    part = (b.to(tl.int64) * num_heads + h) * num_splits + offs_s
    m = tl.load(m_ptr + part, mask=mask_s, other=float("-inf"))
    lsum = tl.load(l_ptr + part, mask=mask_s, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * lsum, 0)
    acc = tl.load(
        acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


DECODE_MAX_SPLITS = 64


def decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int = 132
) -> tuple[int, int]:
    """(num_splits, split_tokens) for flash-decoding.

    Decode is bound by memory bandwidth, which one or two pipelined programs per SM already
    draw near its peak; what hurts is idle SMs. So: with batch * num_kv_heads >= num_sms
    programs there is no split (and no reduce launch). Below that the KV length is split so
    the grid has at most 2 * num_sms programs (all resident at once: the bf16 split kernel
    takes 115 registers/thread and 39 KB of shared memory on sm_90a, so up to 4 fit per SM;
    a single wave, no tail), with at least one BLOCK_N tile per split and at most
    DECODE_MAX_SPLITS splits.
    split_tokens is a multiple of block_n and num_splits * split_tokens >= max_seq_len.
    Examples (8 KV heads, 132 SMs, block_n 64): batch 1 at 8192 tokens -> 32 splits of 256;
    batch 8 at 8192 -> 4 of 2048; batch 16 and up -> 1.
    """
    max_seq_len = max(int(max_seq_len), 1)
    base = max(batch * num_kv_heads, 1)
    n_tiles = triton.cdiv(max_seq_len, block_n)
    splits = 1 if base >= num_sms else min(max(2 * num_sms // base, 1), n_tiles, DECODE_MAX_SPLITS)
    split_tokens = triton.cdiv(n_tiles, splits) * block_n
    return triton.cdiv(max_seq_len, split_tokens), split_tokens


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] -> [B, Hq, D] (q's dtype).

    Flash-decoding: kernel 1 has grid (B, Hkv, num_splits); each program loads the G = Hq/Hkv
    query heads of one KV head once (padded to >= 16 rows for tensor cores) and streams its
    split of the sequence's KV in BLOCK_N-token tiles (gathered through the block table, any
    block_size), keeping an online softmax in fp32. Kernel 2 (grid (B, Hq)) merges the splits;
    with one split, kernel 1 writes the output directly. ``max_seq_len`` must be >= every
    seq_lens[b]; it only sizes the split grid (see :func:`decode_num_splits`). ``num_splits``
    and ``block_n`` override the heuristics (tests, tuning).
    """
    B, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    block_d = triton.next_power_of_2(D)
    if block_n is None:  # sm_90a: no spills at these sizes (16-bit: <= 117 regs; fp32 FMA: <= 92)
        if k_cache.element_size() >= 4:
            block_n = 32 if block_d <= 128 else 16
        else:
            block_n = 64 if block_d <= 128 else 32
    if num_splits is None:
        num_splits, split_tokens = decode_num_splits(B, Hkv, max_seq_len, block_n, _sm_count(q))
    else:
        split_tokens = triton.cdiv(triton.cdiv(max(int(max_seq_len), 1), num_splits), block_n) * block_n
        num_splits = triton.cdiv(max(int(max_seq_len), 1), split_tokens)
    upcast, prec = _dot_config(q, k_cache.dtype)
    block_g = max(16, triton.next_power_of_2(G))
    one = num_splits == 1
    if one:
        m = lsum = acc = out  # unused
    else:
        m = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    num_warps = 4 if block_g * block_d <= 64 * 128 else 8
    stages = 3 if (k_cache.element_size() <= 2 and block_d <= 128) else 2
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, lsum, acc,
        scale * _LOG2E, split_tokens, num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        G=G, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n,
        ONE_SPLIT=one, UPCAST=upcast, DOT_PREC=prec,
        num_warps=num_warps, num_stages=stages,
    )  # fmt: skip
    if not one:
        _decode_reduce_kernel[(B, Hq)](
            out, m, lsum, acc, seq_lens, split_tokens, num_splits, *out.stride(),
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# prefill: varlen causal flash attention over a paged cache


@triton.jit
def _prefill_tile(
    acc,
    m_i,
    l_i,
    q,
    qpos,
    k_head,
    v_head,
    bt_row,
    n0,
    hi,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    mask_d,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Fold keys [n0, n0 + BLOCK_N) into the online softmax; MASKED applies causality and hi."""
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = pos < hi
        blk = tl.load(bt_row + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        mask_kv = mask_d[None, :]
    row = pos % PAGE
    k = tl.load(k_head + (blk * stride_kb + row * stride_kt)[:, None], mask=mask_kv, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where((pos[None, :] <= qpos[:, None]) & mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + (blk * stride_vb + row * stride_vt)[:, None], mask=mask_kv, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    qsl_ptr,
    seq_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_qd,
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
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (tile, kv head, b). The tile's BLOCK_M rows are (query, head-of-group) pairs,
    row r = query r // G, head r % G, so the G heads sharing a KV head share every K/V tile."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (most causal work) tiles first
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // G
    heads = hk * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = qi < q_len
    tok = (q_start + qi).to(tl.int64)
    mask_q = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    qpos = ctx + qi

    # keys [0, lo) are visible to every row of the tile; [lo, hi) need the causal mask
    first_q = (tile * BLOCK_M) // G
    last_q = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    hi = tl.where(first_q < q_len, ctx + last_q + 1, 0)
    lo = tl.minimum(((ctx + first_q) // BLOCK_N) * BLOCK_N, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = k_ptr + hk * stride_kh + offs_d[None, :] * stride_kd
    v_head = v_ptr + hk * stride_vh + offs_d[None, :] * stride_vd
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, qpos, k_head, v_head, bt_row, n0, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
            PAGE, BLOCK_N, False, UPCAST, DOT_PREC,
        )  # fmt: skip
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, qpos, k_head, v_head, bt_row, n0, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, mask_d,
            PAGE, BLOCK_N, True, UPCAST, DOT_PREC,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_q,
    )


def _prefill_config(block_d: int, elem_size: int, interpreting: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head size and cache dtype.

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


def paged_prefill_attention_triton(
    q: torch.Tensor,
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
) -> torch.Tensor:
    """Varlen causal attention of flat queries q [T, Hq, D] over the paged cache -> [T, Hq, D].

    Grid (cdiv(max_query_len * G, BLOCK_M), Hkv, B), no host sync: programs past their
    sequence's q_len do no work. Each program owns BLOCK_M (query, head) rows of one GQA group,
    streams K/V tiles of BLOCK_N tokens through the block table with an fp32 online softmax:
    first the tiles wholly below the tile's first query position (no mask), then the causal
    diagonal tiles. The new tokens' K/V must already be in the cache (reshape_and_cache).
    ``max_query_len`` must be >= every q_len; ``max_seq_len`` is accepted for API symmetry.
    ``block_m``/``block_n`` override the heuristics (tests, tuning).
    """
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    B = seq_lens.shape[0]
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    block_d = triton.next_power_of_2(D)
    bm, bn, warps, stages = _prefill_config(block_d, k_cache.element_size(), _interpreting(q))
    bm = block_m or bm
    bn = block_n or bn
    upcast, prec = _dot_config(q, k_cache.dtype)
    grid = (triton.cdiv(int(max_query_len) * G, bm), Hkv, B)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
        G=G, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_M=bm, BLOCK_N=bn,
        UPCAST=upcast, DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
