"""Mixture of experts: routing (softmax + top-k + renormalize) and the experts' gated MLP.

Shapes: x [T, H] tokens; router logits [T, E]; expert weights stacked per expert,
``w13 [E, 2I, H]`` (gate rows then up rows, as nn.Linear weights) and ``w2 [E, H, I]``.
Routing returns ``topk_weights`` fp32 [T, k] and ``topk_ids`` int32 [T, k], best first.

Semantics shared by the reference and the Triton kernels (``x.dtype`` is the storage dtype):
``gate, up = x @ w13[e]^T`` rounded to x.dtype; ``h = silu(gate) * up`` rounded to x.dtype;
``y = (h @ w2[e]^T) * topk_weight`` in fp32, rounded to x.dtype per (token, slot); the output
row is the fp32 sum of a token's k slots, rounded once.

The Triton path (CUDA) sorts the T * k (token, slot) pairs by expert (``moe_align_block_size``;
rtllm.kernels.triton_moe_routing.moe_align_block_size_triton gives the same outputs in two launches) and
runs each GEMM as ONE launch over all experts; this module holds the torch references, the
alignment's reference and the dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtllm.kernels import gemm
from rtllm.kernels.dispatch import custom_kernel, triton_enabled

# --------------------------------------------------------------------------------------------
# routing


def fused_topk_torch(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the E experts (fp32), the k largest probabilities, optionally divided by their sum."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [T, k], topk_ids int32 [T, k]) from router logits [T, E]."""
    if triton_enabled(router_logits):
        from rtllm.kernels import triton_moe

        return triton_moe.fused_topk_triton(router_logits, top_k, renormalize)
    return fused_topk_torch(router_logits, top_k, renormalize)


def route_torch(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``x @ router_weight^T`` in x's dtype, then fused_topk_torch."""
    return fused_topk_torch(F.linear(x, router_weight), top_k, renormalize)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32 [T, k], topk_ids int32 [T, k]) of tokens x [T, H] under the router weight
    [E, H]: fused_topk(x @ router_weight^T) with the logits in x's dtype. On CUDA with few tokens (batch
    decode) the GEMM and the routing run as one launch (triton_moe_routing.router_topk_triton); else the
    GEMM (a plugin's "linear" kernel if one is registered, which also keeps the unfused path) and
    fused_topk."""
    if triton_enabled(x) and custom_kernel("linear", x) is None:
        from rtllm.kernels import triton_moe_routing

        routed = triton_moe_routing.router_topk_triton(x, router_weight, top_k, renormalize)
        if routed is not None:
            return routed
    return fused_topk(gemm.linear(x, router_weight), top_k, renormalize)


# --------------------------------------------------------------------------------------------
# sort (token, slot) pairs by expert


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the N = T * k (token, slot) pairs by expert, each expert's run padded to ``block_m``.

    Returns ``sorted_ids`` int32 [P]: flat slot ids ``t * k + j`` grouped by expert (stable within
    an expert), padding entries equal to N; and ``block_expert`` int32 [P / block_m]: the expert of
    each block of block_m entries, -1 for blocks past the last expert's run (the GEMM skips them).

    P is a static upper bound, ``N + min(E, N) * (block_m - 1)`` rounded up to block_m, so nothing
    here reads a device value back to the host (CUDA-graph safe). Ids outside [0, E) (experts held
    by another rank) are left out: their slots are never written by the GEMMs.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    bound = n + min(num_experts, n) * (block_m - 1)
    padded_len = -(-bound // block_m) * block_m
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # foreign experts sort last and are dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    keep = sorted_key < num_experts
    e = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(n, device=dev) - start[e]
    dest = torch.where(keep, padded_start[e] + rank, padded_len)  # dropped pairs land in a spare slot
    sorted_ids = torch.full((padded_len + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, padded_len, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids[:padded_len], block_expert


# --------------------------------------------------------------------------------------------
# experts


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """Loop over the experts that received tokens; out [T, H] in x.dtype (ids outside [0, E) skipped)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    token_of = torch.arange(T, device=x.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < E:
            continue
        slots = (flat_ids == e).nonzero().squeeze(1)
        tok = token_of[slots]
        gu = F.linear(x[tok], w13[e])
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = (F.linear(h, w2[e]).float() * flat_w[slots, None]).to(x.dtype)
        out.index_add_(0, tok, y.float())
    return out.to(x.dtype)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, foreign_ids: bool = False) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for every token t: [T, H] in x.dtype.

    ``foreign_ids``: some ids lie outside [0, E) (experts held by another rank under expert
    parallelism); their slots contribute zero."""
    if triton_enabled(x):
        from rtllm.kernels import triton_moe

        return triton_moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids, foreign_ids=foreign_ids)
    return fused_experts_torch(x, w13, w2, topk_weights, topk_ids)
