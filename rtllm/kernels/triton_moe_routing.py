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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.device_buffers import device_buffer
from rtllm.kernels.triton_attention.common import pdl_enabled

# --------------------------------------------------------------------------------------------
# routing


@triton.jit
def _softmax_topk_store(
    x, rows, mask_t, E, w_ptr, ids_ptr, stride_w, stride_i,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Routing of BLOCK_T rows of fp32 logits x [BLOCK_T, BLOCK_E] (columns >= E: anything; rows not in
    mask_t: finite, never stored): softmax, k rounds of argmax (best first, ties to the lower expert
    id), optionally renormalized; stores weights and ids of the rows ``rows`` (int64)."""
    offs_e = tl.arange(0, BLOCK_E)
    x = tl.where((offs_e < E)[None, :], x, float("-inf"))
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
    _softmax_topk_store(x, rows, mask_t, E, w_ptr, ids_ptr, stride_w, stride_i, TOP_K, RENORM, BLOCK_T, BLOCK_E,
                        BLOCK_K)


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
# router GEMM + routing in one launch (few tokens)

# Past these the cuBLAS GEMM + fused_topk_triton: every expert's program reads all its rows of x, E * T * H
# elements in all. H100, per layer: Qwen3-MoE router (E 128, H 2048) fused 5.3 / 6.2 / 8.5 us at 1 / 4 / 8
# tokens against 7.9 / 8.0 / 7.7 unfused (x read 0.5 / 2 / 4 MiB); Mixtral (E 8, H 4096) 4.1 / 3.9 / 4.5
# against 7.8 / 7.5 / 7.5 (at most 0.5 MiB).
ROUTER_FUSED_MAX_TOKENS = 8
ROUTER_FUSED_MAX_X_BYTES = 2 << 20
_ROUTER_MIN_CHUNK = 512  # elements of H per program at least (a split smaller than this costs more than it hides)


@triton.jit
def _router_weight_tile(gw_ptr, e, stride_g, offs_h, H):
    """Columns offs_h of expert e's router-weight row (zeros past H)."""
    return tl.load(gw_ptr + e.to(tl.int64) * stride_g + offs_h, mask=offs_h < H, other=0.0)


@triton.jit(do_not_specialize=["T"])
def _router_topk_kernel(
    x_ptr, gw_ptr, part_ptr, cnt_ptr, w_ptr, ids_ptr, T, E, H, stride_x, stride_g, stride_w, stride_i,
    SPLIT: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (e, s) of E * SPLIT: expert e's fp32 dot products with the T rows of x over H columns
    [s * CHUNK, (s + 1) * CHUNK) -> part [SPLIT, BLOCK_T, BLOCK_E]; then bumps the counter (acq_rel).
    The program that arrives last sums the splits in order, rounds the logits to x's dtype (as the
    unfused GEMM stores them), routes every row as _topk_softmax_kernel does, and resets the counter.
    PDL: launched while the norm before it runs; requests its first router-weight tile, then waits for the
    norm before reading x (the expert GEMV may start)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    e = pid // SPLIT
    s = pid % SPLIT
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    # the first tile of this program's router weight is requested before the wait (it does not depend
    # on the kernel before; x does)
    g0 = _router_weight_tile(gw_ptr, e, stride_g, s * CHUNK + tl.arange(0, BLOCK_H), H)
    if PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in tl.static_range(0, CHUNK, BLOCK_H):
        offs_h = s * CHUNK + k0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        g = (g0 if k0 == 0 else _router_weight_tile(gw_ptr, e, stride_g, offs_h, H)).to(tl.float32)
        xv = tl.load(x_ptr + rows[:, None] * stride_x + offs_h[None, :], mask=mask_t[:, None] & mask_h[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv * g[None, :], axis=1)
    tl.store(part_ptr + (s * BLOCK_T + offs_t) * BLOCK_E + e, acc)
    tl.debug_barrier()  # all of this program's partial stores happen before the release below
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if done == E * SPLIT - 1:
        offs_e = tl.arange(0, BLOCK_E)
        mask = mask_t[:, None] & (offs_e < E)[None, :]
        tot = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            tot += tl.load(part_ptr + (j * BLOCK_T + offs_t[:, None]) * BLOCK_E + offs_e[None, :], mask=mask,
                           other=0.0, cache_modifier=".cg")
        logits = tot.to(x_ptr.dtype.element_ty).to(tl.float32)
        _softmax_topk_store(logits, rows, mask_t, E, w_ptr, ids_ptr, stride_w, stride_i, TOP_K, RENORM, BLOCK_T,
                            BLOCK_E, BLOCK_K)
        tl.atomic_xchg(cnt_ptr, 0)


def _router_counter(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed int32 arrival counter (each launch leaves it at zero), or None during a
    CUDA-graph capture before it exists (rtllm.kernels.device_buffers)."""
    return device_buffer("moe_router_counter", device, lambda: torch.zeros(1, dtype=torch.int32, device=device))


def router_fusable(T: int, E: int, H: int, element_size: int) -> bool:
    """Whether router_topk_triton takes T tokens (else its caller runs the GEMM and fused_topk_triton)."""
    return T <= ROUTER_FUSED_MAX_TOKENS and E * T * H * element_size <= ROUTER_FUSED_MAX_X_BYTES


def router_split(E: int, H: int) -> int:
    """Programs per expert: enough programs to spread the router weight's read over ~128 SMs
    (Qwen3-MoE, 128 experts: 1; Mixtral, 8 experts of H 4096: 8 of 512 columns)."""
    split = 1
    while E * split < 128 and H // (2 * split) >= _ROUTER_MIN_CHUNK:
        split *= 2
    return split


def router_topk_triton(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fused_topk_triton(x @ weight^T, top_k, renormalize) in one launch, for the few rows of x [T, H]
    that router_fusable takes, and the router weight [E, H]; None (the caller runs the unfused path) for
    more rows or during a CUDA-graph capture before the device's counter exists.

    The logits are fp32 sums rounded to x's dtype, as the unfused GEMM stores them; only the order of
    the fp32 additions differs from cuBLAS's (a bf16 logit can come out one ulp apart when its fp32
    sum lies that close to a rounding midpoint). Routing is the same code as fused_topk_triton's.
    The launches sharing a device's counter run one after another (one stream), as a model's do."""
    T, H = x.shape
    E = weight.shape[0]
    assert weight.shape == (E, H) and 0 < top_k <= E, (tuple(weight.shape), H, top_k)
    if not router_fusable(T, E, H, x.element_size()):
        return None
    cnt = _router_counter(x.device)
    if cnt is None:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    gw = weight if weight.stride(-1) == 1 else weight.contiguous()
    # the router weight is read before the PDL wait: a copy made just now (a kernel before this one) must not be
    pdl = pdl_enabled(x) and gw is weight
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids
    block_t = triton.next_power_of_2(T)
    block_e = triton.next_power_of_2(E)
    split = router_split(E, H)
    chunk = triton.next_power_of_2(triton.cdiv(H, split))
    block_h = min(chunk, max(256, 4096 // block_t))  # x tile [BLOCK_T, BLOCK_H] + weight row in registers
    part = torch.empty(split * block_t * block_e, dtype=torch.float32, device=x.device)
    if num_warps is None:
        num_warps = 1 if block_t * block_e <= 256 and block_t * block_h <= 2048 else 4
    _router_topk_kernel[(E * split,)](
        x, gw, part, cnt, weights, ids, T, E, H, x.stride(0), gw.stride(0), weights.stride(0), ids.stride(0),
        SPLIT=split, CHUNK=chunk, TOP_K=top_k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl,
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
