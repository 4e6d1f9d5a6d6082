"""Triton MoE: fused routing and the grouped expert GEMMs (one launch for all experts).

Semantics are those of :mod:`rtllm.kernels.moe` (the references).

Routing (top-k) and the expert alignment are in :mod:`rtllm.kernels.triton_moe_routing`.

Experts: ``moe_align_block_size`` lists the N = T * k (token, slot) pairs grouped by expert, each
expert's run padded to BLOCK_M, so every block of BLOCK_M rows belongs to one expert. The first
launch computes gate and up tiles for a block (rows gathered from x through the sorted ids, the
expert's weights read once per block) and writes ``silu(gate) * up`` [N, I]; the second launch
multiplies by w2, scales each row by its routing weight and writes [N, H]; a sum over the k slots
combines them. Blocks past the last expert's run (expert -1) exit at once, so the grid size is a
static function of T and nothing is read back to the host (CUDA-graph safe). With few pairs
(batch-1 decode) the GEMMs skip the alignment: row block m is pair m alone, its expert read from
topk_ids (PAIR_BLOCKS).

Decode (``GEMV``, the default when PAIR_BLOCKS would be: T * k <= E / 4): GEMV-shaped launches
instead of 16-row tiles, in :mod:`rtllm.kernels.triton_moe_gemv`. Config GEMV=False keeps the
pair-block GEMMs.

Integers that change with the number of tokens are not specialized (``do_not_specialize``): a new
batch size never compiles a new variant; only the block-size tier (moe_gemm_config) does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_attention.common import interpreting
from rtllm.kernels.triton_moe_gemv import fused_experts_gemv, moe_gemv_config
from rtllm.kernels.triton_moe_routing import fused_topk_triton, moe_align_block_size_triton

__all__ = ["fused_experts_triton", "fused_topk_triton", "moe_align_block_size_triton", "moe_gemm_config"]

# --------------------------------------------------------------------------------------------
# grouped expert GEMM


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])  # change with the token count
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
    when pairs are at most a quarter of the experts, so that few experts appear twice (batch 1 always);
    there GEMV (the decode launches, moe_gemv_config) replaces the GEMMs unless a config says GEMV=False."""
    pair_blocks = num_pairs * 4 <= num_experts
    if interpreting:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1, PAIR_BLOCKS=pair_blocks,
                    GEMV=pair_blocks)
    if pair_blocks:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, PAIR_BLOCKS=True,
                    GEMV=True)
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


# --------------------------------------------------------------------------------------------
# the k-slot sum when some slots were never written (foreign experts)


@triton.jit(do_not_specialize=["T"])
def _moe_slot_sum_kernel(y_ptr, ids_ptr, out_ptr, T, N, num_experts, stride_ym, stride_om,
                         TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """out[t] = sum over slots j with ids[t, j] in [0, E) of y[t * k + j], in fp32, rounded once."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = offs_t * TOP_K + j
        e = tl.load(ids_ptr + pair, mask=mask_t, other=-1)
        ok = mask_t & (e >= 0) & (e < num_experts)
        acc += tl.load(y_ptr + pair.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
                       mask=ok[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    out = out_ptr + offs_t.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


def _slot_sum(y: torch.Tensor, ids: torch.Tensor, T: int, top_k: int, num_experts: int) -> torch.Tensor:
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    block_n = min(1024, triton.next_power_of_2(H))
    _moe_slot_sum_kernel[(T, triton.cdiv(H, block_n))](
        y, ids, out, T, H, num_experts, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_T=1, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# entry point


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, config: dict | None = None,
                         foreign_ids: bool = False) -> torch.Tensor:
    """out [T, H] = sum over k of topk_weights * expert(x): two grouped-GEMM launches and a sum.

    x [T, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous along their last dim), topk_* [T, k].
    ``foreign_ids``: some ids may lie outside [0, E) (experts of another rank); those pairs then
    contribute zero (no memset: the slot sum and the GEMV launches skip them). ``config``
    overrides block sizes and the path (PAIR_BLOCKS, GEMV, PDL)."""
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
    interp = interpreting(x)
    cfg = {**moe_gemm_config(num_pairs, E, interp), **moe_gemv_config(H, inter, x.device), **(config or {})}
    pair_blocks = cfg.pop("PAIR_BLOCKS")
    gemv = cfg.pop("GEMV", False)
    topk_w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    flat_ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    if gemv:
        return fused_experts_gemv(x, w13, w2, topk_w, flat_ids, top_k, cfg)
    if pair_blocks:  # one row block per pair, its expert read from topk_ids: no alignment launches
        sorted_ids = block_expert = flat_ids
    else:
        sorted_ids, block_expert = moe_align_block_size_triton(flat_ids, E, cfg["BLOCK_M"])
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch_gemm(x, w13, h, topk_w, sorted_ids, block_expert, inter, H, num_pairs, top_k, True, False, cfg,
                 pair_blocks)
    y = torch.empty(num_pairs, H, dtype=x.dtype, device=x.device)
    _launch_gemm(h, w2, y, topk_w, sorted_ids, block_expert, H, inter, num_pairs, 1, False, True, cfg, pair_blocks)
    if foreign_ids:  # pairs of foreign experts were never written: the sum skips them
        return _slot_sum(y, flat_ids, T, top_k, E)
    if top_k == 1:
        return y
    return y.view(T, top_k, H).sum(dim=1)  # accumulated in fp32 and rounded once, also for 16-bit y
