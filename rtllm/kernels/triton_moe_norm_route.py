"""Triton: the residual add + RMSNorm before a MoE block, its router GEMM and the routing, in one launch
for the few tokens of a decode step.

Unfused, a decode layer runs the norm (one program a row), then the router (one program an expert, its
dot products with the norm's output, then the last program's softmax + top-k). Here each of the E
programs normalizes the rows itself (the norm kernel's arithmetic, rms_norm_row, with its warps: the
same bits), takes its expert's dot products with the rounded output, and the last to arrive routes
(triton_moe_routing.route_on_arrival). Program 0 stores the normalized rows and the residual sum. One
launch boundary fewer on the critical path of every MoE layer. The logits are fp32 sums over the whole
row in this kernel's order (the router launch sums tiles in its own), rounded to the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_attention.common import pdl_enabled
from rtllm.kernels.triton_moe_routing import ROUTER_FUSED_MAX_TOKENS, route_on_arrival, router_counter
from rtllm.kernels.triton_norm import norm_warps, norm_weight, rms_norm_row

# the norm's row and the router-weight row are held whole in registers
NORM_ROUTE_MAX_HIDDEN = 8192


@triton.jit(do_not_specialize=["T"])
def _norm_route_kernel(
    h_ptr, r_ptr, nw_ptr, y_ptr, s_ptr, gw_ptr, part_ptr, cnt_ptr, w_ptr, ids_ptr, T, E, eps,
    stride_h, stride_r, stride_y, stride_s, stride_g, stride_w, stride_i,
    H: tl.constexpr, BLOCK: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program e of E: for each of the T rows, y = rms_norm(h + r) * nw (rounded to y's dtype; program 0
    stores it and h + r), its logit y . gw[e] in fp32 -> part[row, e]; then route_on_arrival. PDL: the
    norm weight and the router-weight row are requested before the wait, h and r read after it."""
    if PDL:
        gdc_launch_dependents()
    e = tl.program_id(0)
    w = norm_weight(nw_ptr, H, BLOCK)
    offs = tl.arange(0, BLOCK)
    g = tl.load(gw_ptr + e.to(tl.int64) * stride_g + offs, mask=offs < H, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    first = e == 0
    for t in range(T):  # T <= ROUTER_FUSED_MAX_TOKENS rows: 32-bit offsets suffice
        y, offs, mask = rms_norm_row(h_ptr, r_ptr, w, s_ptr, t, stride_h, stride_r, stride_s, eps, H, BLOCK, True,
                                     first)
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t * stride_y + offs, y, mask=mask & first)
        tl.store(part_ptr + t * BLOCK_E + e, tl.sum(y.to(tl.float32) * g, axis=0))
    route_on_arrival(part_ptr, cnt_ptr, w_ptr, ids_ptr, T, E, stride_w, stride_i, y_ptr.dtype.element_ty, 1, TOP_K,
                     RENORM, BLOCK_T, BLOCK_E, BLOCK_K)


def norm_route_fusable(T: int, H: int) -> bool:
    """Whether norm_route_triton takes T rows of width H."""
    return 0 < T <= ROUTER_FUSED_MAX_TOKENS and H <= NORM_ROUTE_MAX_HIDDEN


def norm_route_triton(h: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      router_weight: torch.Tensor, top_k: int, renormalize: bool):
    """(rms_norm(h + residual) * norm_weight, h + residual, topk_weights fp32 [T, k], topk_ids int32 [T, k])
    for h, residual [T, H] and the router weight [E, H]: fused_add_rms_norm_triton, then router_topk_triton
    on its output, in one launch. None (the caller runs the two) past norm_route_fusable, or during a
    CUDA-graph capture before the device's arrival counter exists."""
    T, H = h.shape
    E = router_weight.shape[0]
    assert residual.shape == h.shape and norm_weight.shape == (H,) and router_weight.shape == (E, H)
    assert 0 < top_k <= E, (top_k, E)
    if not norm_route_fusable(T, H):
        return None
    cnt = router_counter(h.device)
    if cnt is None:
        return None
    h, residual, nw, gw = (t if t.stride(-1) == 1 else t.contiguous()
                           for t in (h, residual, norm_weight, router_weight))
    # weights are read before the PDL wait: a copy made just now (a kernel before this one) must not be
    pdl = pdl_enabled(h) and nw is norm_weight and gw is router_weight
    y = torch.empty(T, H, dtype=torch.promote_types(h.dtype, norm_weight.dtype), device=h.device)
    s = torch.empty(T, H, dtype=torch.promote_types(h.dtype, residual.dtype), device=h.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=h.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=h.device)
    block_t = triton.next_power_of_2(T)
    block_e = triton.next_power_of_2(E)
    part = torch.empty(block_t * block_e, dtype=torch.float32, device=h.device)
    block = triton.next_power_of_2(H)
    _norm_route_kernel[(E,)](
        h, residual, nw, y, s, gw, part, cnt, weights, ids, T, E, eps, h.stride(0), residual.stride(0),
        y.stride(0), s.stride(0), gw.stride(0), weights.stride(0), ids.stride(0),
        H=H, BLOCK=block, TOP_K=top_k, RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), PDL=pdl,
        num_warps=norm_warps(block),  # the norm kernel's warps: the same reduction, the same bits
        enable_fp_fusion=False, launch_pdl=pdl,
    )  # fmt: skip
    return y, s, weights, ids
