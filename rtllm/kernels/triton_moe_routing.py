"""Triton MoE routing: fused softmax + top-k (+ renormalize), and the expert alignment that sorts
the (token, slot) pairs by expert for the grouped GEMMs of :mod:`rtllm.kernels.triton_moe`.
Semantics are those of :mod:`rtllm.kernels.moe` (the references).

Routing: one program takes BLOCK_T tokens' logits [BLOCK_T, E] into registers, computes the
softmax in fp32, extracts the top k by k rounds of argmax (best first, ties to the lower expert
id) and renormalizes in place.

Alignment runs as two Triton launches (a histogram per chunk of pairs, then each chunk sorted
by expert and placed, each block's expert and padding filled): the torch version's ~30 small
launches per layer made an eager prefill host-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# routing


@triton.jit(do_not_specialize=["T"])
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_l, stride_w, stride_i,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    x = tl.load(logits_ptr + rows[:, None] * stride_l + offs_e[None, :],
                mask=mask_t[:, None] & (offs_e < E)[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(mask_t[:, None], x, 0.0)  # padding rows: finite, never stored
    m = tl.max(x, axis=1)
    p = tl.exp(x - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where((offs_e < E)[None, :], p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        val, best = tl.max(p, axis=1, return_indices=True, return_indices_tie_break_left=True)  # one reduction
        best = best.to(tl.int32)
        vals = tl.where(offs_k[None, :] == j, val[:, None], vals)
        idx = tl.where(offs_k[None, :] == j, best[:, None], idx)
        p = tl.where(offs_e[None, :] == best[:, None], -2.0, p)
    if RENORM:
        vals = vals / tl.sum(vals, axis=1)[:, None]
    mask = mask_t[:, None] & (offs_k < TOP_K)[None, :]
    tl.store(w_ptr + rows[:, None] * stride_w + offs_k[None, :], vals, mask=mask)
    tl.store(ids_ptr + rows[:, None] * stride_i + offs_k[None, :], idx, mask=mask)


def fused_topk_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [T, k], topk_ids int32 [T, k]); grid cdiv(T, BLOCK_T)."""
    T, E = router_logits.shape
    assert 0 < top_k <= E, (top_k, E)
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(16, 4096 // block_e, triton.next_power_of_2(T)))
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        logits, weights, ids, T, E, logits.stride(0), weights.stride(0), ids.stride(0),
        TOP_K=top_k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        # one warp while a row fits in it: the k rounds of max then shuffle within the warp, without
        # a shared-memory exchange and barrier each (batch-1 decode: one program, one row)
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if block_t * block_e <= 256 else 4,
    )  # fmt: skip
    return weights, ids


# --------------------------------------------------------------------------------------------
# alignment: the (token, slot) pairs grouped by expert, each expert's run padded to BLOCK_M


@triton.jit(do_not_specialize=["N"])
def _moe_count_kernel(ids_ptr, counts_ptr, N, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[c, e] = pairs of chunk c (CHUNK consecutive flat slots) routed to expert e (local ids
    in [0, E) only)."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
    ok = (offs < N) & (ids >= 0) & (ids < num_experts)
    hist = tl.histogram(tl.where(ok, ids, 0), BLOCK_E, mask=ok)
    tl.store(counts_ptr + c * BLOCK_E + tl.arange(0, BLOCK_E), hist)


@triton.jit(do_not_specialize=["N", "num_chunks", "num_blocks"])
def _moe_place_kernel(
    ids_ptr, counts_ptr, base_ptr, sorted_ids_ptr, block_expert_ptr, N, num_experts, num_chunks, num_blocks,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Program p: places chunk p's pairs (p < num_chunks) and fills blocks [p * BLOCK_B, (p+1) * BLOCK_B).

    Every program derives the same run layout from the counts: expert e's run starts at
    padded_start[e] (runs padded to BLOCK_M, in expert order); a pair's place in it is the pairs of e
    in earlier chunks plus its rank among e's pairs in its own chunk (a sort of the chunk by
    (expert, slot): stable, as the reference's argsort). A block's expert is the number of runs that
    end at or before its start (-1 past the last); its slots past the run's real pairs get N."""
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    mine = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        rows = c0 + tl.arange(0, ROWS)
        cnt = tl.load(counts_ptr + rows[:, None] * BLOCK_E + offs_e[None, :], mask=(rows < num_chunks)[:, None],
                      other=0)
        total += tl.sum(cnt, axis=0)
        before += tl.sum(tl.where((rows < pid)[:, None], cnt, 0), axis=0)
        mine += tl.sum(tl.where((rows == pid)[:, None], cnt, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    if pid < num_chunks:
        # slot of the pair at sorted position i of this chunk: base[e] + i, base = run start + the
        # pairs of e in earlier chunks - the pairs of smaller experts in this chunk
        tl.store(base_ptr + pid * BLOCK_E + offs_e, padded_start + before - (tl.cumsum(mine, axis=0) - mine))
        tl.debug_barrier()
        offs = tl.arange(0, CHUNK)
        flat = pid * CHUNK + offs
        ids = tl.load(ids_ptr + flat, mask=flat < N, other=-1)
        ok = (flat < N) & (ids >= 0) & (ids < num_experts)
        key = tl.sort(tl.where(ok, ids, BLOCK_E) * CHUNK + offs)  # other ranks' experts and the tail last
        e_s = key // CHUNK
        real = e_s < BLOCK_E
        dest = tl.load(base_ptr + pid * BLOCK_E + e_s, mask=real, other=0) + offs
        tl.store(sorted_ids_ptr + dest, pid * CHUNK + key % CHUNK, mask=real)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < num_blocks
    start = offs_b * BLOCK_M
    is_e = (offs_e < num_experts)[None, :]
    expert = tl.sum(((padded_end[None, :] <= start[:, None]) & is_e).to(tl.int32), axis=1)
    has = expert < num_experts
    real_end = tl.sum(tl.where((offs_e[None, :] == expert[:, None]) & is_e, (padded_start + total)[None, :], 0), axis=1)
    tl.store(block_expert_ptr + offs_b, tl.where(has, expert, -1), mask=mask_b)
    pos = start[:, None] + tl.arange(0, BLOCK_M)[None, :]
    pad = (~has)[:, None] | (pos >= real_end[:, None])
    tl.store(sorted_ids_ptr + pos, tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.int32) + N, mask=mask_b[:, None] & pad)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int,
                                block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rtllm.kernels.moe.moe_align_block_size in two launches (the same outputs, bit for bit).

    The torch version takes some 30 small launches per call; at prefill the host spent longer
    issuing them than the GPU ran the layer (an eager 128-token prefill of Qwen3-30B-A3B on H100:
    69 ms of host launch work for 14 ms of kernels)."""
    flat = topk_ids.reshape(-1)
    flat = flat if flat.dtype == torch.int32 and flat.is_contiguous() else flat.to(torch.int32).contiguous()
    n = flat.numel()
    bound = n + min(num_experts, n) * (block_m - 1)
    padded_len = -(-bound // block_m) * block_m
    num_blocks = padded_len // block_m
    dev = flat.device
    sorted_ids = torch.empty(padded_len, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    if n == 0:
        return sorted_ids, block_expert
    chunk = min(4096, max(256, triton.next_power_of_2(triton.cdiv(n, 128))))
    num_chunks = triton.cdiv(n, chunk)
    block_e = triton.next_power_of_2(num_experts)
    block_b = 16
    grid = max(num_chunks, triton.cdiv(num_blocks, block_b))
    counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=dev)
    base = torch.empty(num_chunks, block_e, dtype=torch.int32, device=dev)
    _moe_count_kernel[(num_chunks,)](flat, counts, n, num_experts, CHUNK=chunk, BLOCK_E=block_e, num_warps=4)
    _moe_place_kernel[(grid,)](
        flat, counts, base, sorted_ids, block_expert, n, num_experts, num_chunks, num_blocks,
        CHUNK=chunk, BLOCK_E=block_e, ROWS=max(1, min(16, 2048 // block_e)), BLOCK_M=block_m, BLOCK_B=block_b,
        num_warps=4,
    )  # fmt: skip
    return sorted_ids, block_expert
