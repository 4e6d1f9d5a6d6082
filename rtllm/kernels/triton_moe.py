"""Triton MoE: fused routing and the grouped expert GEMMs (one launch for all experts).

Semantics are those of :mod:`rtllm.kernels.moe` (the references).

Routing: one program takes BLOCK_T tokens' logits [BLOCK_T, E] into registers, computes the
softmax in fp32, extracts the top k by k rounds of argmax (best first, ties to the lower expert
id) and renormalizes in place.

Experts: ``moe_align_block_size`` lists the N = T * k (token, slot) pairs grouped by expert, each
expert's run padded to BLOCK_M, so every block of BLOCK_M rows belongs to one expert. The first
launch computes gate and up tiles for a block (rows gathered from x through the sorted ids, the
expert's weights read once per block) and writes ``silu(gate) * up`` [N, I]; the second launch
multiplies by w2, scales each row by its routing weight and writes [N, H]; a sum over the k slots
combines them. Blocks past the last expert's run (expert -1) exit at once, so the grid size is a
static function of T and nothing is read back to the host (CUDA-graph safe). With few pairs
(batch-1 decode) the GEMMs skip the alignment: row block m is pair m alone, its expert read from
topk_ids (PAIR_BLOCKS), so a decode step runs routing, two GEMMs and the sum, nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.moe import moe_align_block_size
from rtllm.kernels.triton_attention.common import interpreting

# --------------------------------------------------------------------------------------------
# routing


@triton.jit
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
        best = tl.argmax(p, axis=1, tie_break_left=True).to(tl.int32)
        val = tl.max(p, axis=1)
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
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_e >= 128 else 1,
    )  # fmt: skip
    return weights, ids


# --------------------------------------------------------------------------------------------
# grouped expert GEMM


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, block_expert_ptr,
    N, K, num_pairs, num_m_blocks, num_experts,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, PAIR_BLOCKS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[pair] = epilogue(A[pair // A_ROW_DIV] @ B[expert]^T) for one BLOCK_M x BLOCK_N tile.

    GATED: B holds [gate; up] (2N rows) and C = silu(gate) * up, N columns.
    MUL_WEIGHT: each row is scaled by its pair's routing weight (fp32).
    PAIR_BLOCKS: row block m holds pair m alone and ``block_expert_ptr`` is the flat topk_ids (no
    alignment step: few pairs, e.g. batch-1 decode, where the sort's launches would cost more than
    the GEMMs' idle rows)."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row blocks (mostly one expert) sweep the N blocks together
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    expert = tl.load(block_expert_ptr + pid_m)
    if (expert < 0) | (expert >= num_experts):  # past the last expert's run, or another rank's expert
        return
    if PAIR_BLOCKS:
        pairs = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
    else:
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = pairs < num_pairs
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b_ptrs = b_base + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        up_ptrs = b_ptrs + N * stride_bn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PREC)
        if GATED:
            u = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            acc_up += tl.dot(a, u, input_precision=DOT_PREC)
            up_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    out_ty = c_ptr.dtype.element_ty
    if GATED:
        g = acc.to(out_ty).to(tl.float32)
        u = acc_up.to(out_ty).to(tl.float32)
        acc = g / (1.0 + tl.exp(-g)) * u
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + pairs, mask=mask_m, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(out_ty), mask=mask_m[:, None] & mask_n[None, :])


def moe_gemm_config(num_pairs: int, num_experts: int, interpreting: bool) -> dict:
    """Block sizes for both GEMMs (BLOCK_M is also the alignment of each expert's run).

    Few pairs per expert (decode): BLOCK_M 16, long K tiles, weight-bandwidth bound. Many pairs
    (prefill): 64 x 64/128 tiles for tensor-core reuse. PAIR_BLOCKS (a row block per pair, no sort)
    when pairs are at most a quarter of the experts, so that few experts appear twice (batch 1 always)."""
    pair_blocks = num_pairs * 4 <= num_experts
    if interpreting:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1, PAIR_BLOCKS=pair_blocks)
    if pair_blocks:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, PAIR_BLOCKS=True)
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, PAIR_BLOCKS=False)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4, PAIR_BLOCKS=False)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, PAIR_BLOCKS=False)


def _dot_config(x: torch.Tensor) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC): the interpreter upcasts 16-bit tiles; fp32 uses IEEE dots (matches the reference)."""
    upcast = interpreting(x) and x.dtype != torch.float32
    prec = "ieee" if (x.dtype == torch.float32 or upcast) else "tf32"
    return upcast, prec


def _launch_gemm(a, b, c, topk_w, sorted_ids, block_expert, N, K, num_pairs, a_row_div, gated, mul_weight, cfg,
                 pair_blocks=False):
    upcast, prec = _dot_config(a)
    num_m_blocks = block_expert.numel()
    grid = (num_m_blocks * triton.cdiv(N, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, topk_w, sorted_ids, block_expert, N, K, num_pairs, num_m_blocks, b.shape[0],
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=mul_weight, PAIR_BLOCKS=pair_blocks, UPCAST=upcast,
        DOT_PREC=prec,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, config: dict | None = None,
                         foreign_ids: bool = False) -> torch.Tensor:
    """out [T, H] = sum over k of topk_weights * expert(x); two grouped-GEMM launches and a sum.

    x [T, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous along their last dim), topk_* [T, k].
    ``foreign_ids``: some ids may lie outside [0, E) (experts of another rank); those pairs then
    contribute zero (costs one memset of the [T * k, H] buffer). ``config`` overrides block sizes."""
    T, H = x.shape
    E, two_i, H2 = w13.shape
    inter = two_i // 2
    assert H2 == H and w2.shape == (E, H, inter), (x.shape, w13.shape, w2.shape)
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    top_k = topk_ids.shape[1]
    num_pairs = T * top_k
    if T == 0:
        return x.new_empty(T, H)
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = dict(moe_gemm_config(num_pairs, E, interpreting(x)), **(config or {}))
    pair_blocks = cfg.pop("PAIR_BLOCKS")
    if pair_blocks:  # one row block per pair, its expert read from topk_ids: no alignment launches
        sorted_ids = block_expert = topk_ids.reshape(-1).to(torch.int32).contiguous()
    else:
        sorted_ids, block_expert = moe_align_block_size(topk_ids, E, cfg["BLOCK_M"])
    topk_w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch_gemm(x, w13, h, topk_w, sorted_ids, block_expert, inter, H, num_pairs, top_k, True, False, cfg,
                 pair_blocks)
    # pairs of foreign experts are never written: zero them so the combine ignores them
    y = (torch.zeros if foreign_ids else torch.empty)(num_pairs, H, dtype=x.dtype, device=x.device)
    _launch_gemm(h, w2, y, topk_w, sorted_ids, block_expert, H, inter, num_pairs, 1, False, True, cfg, pair_blocks)
    if top_k == 1:
        return y
    return y.view(T, top_k, H).sum(dim=1)  # accumulated in fp32 and rounded once, also for 16-bit y
