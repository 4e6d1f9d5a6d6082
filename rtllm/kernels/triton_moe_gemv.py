"""Triton MoE decode: GEMV-shaped expert launches for a few (token, slot) pairs (the path
:func:`rtllm.kernels.triton_moe.fused_experts_triton` takes by default when T * k <= E / 4).

Instead of 16-row tiles, one program per (pair, block of I rows) computes gate and up and writes
``silu(gate) * up``; one per (token, block of H rows) runs the token's k slots at once (a [k, rows,
K tile] load) and adds their rounded, weighted outputs in fp32 in a fixed order (no sum launch, no
atomics). Each program loads the next K tile before reducing the current one (Triton software-
pipelines only loads that feed a dot, so the K loop prefetches by hand), and on Hopper the down
launch is a programmatic dependent launch (PDL): its programs start while the last gate/up programs
run, request their first weight tiles, then wait for h. H100, Qwen3-30B-A3B, the experts alone
(scripts/moe_kernel_bench.py --decode): 29.6 us a layer at batch 1 (2.55 TB/s; the tiled path 35.5),
55.4 at 2 tokens (61.8), 99.3 at 4 (2.84 TB/s, copy bandwidth; 112.6).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.triton_attention.common import pdl_enabled

__all__ = ["fused_experts_gemv", "moe_gemv_config"]


@triton.jit
def _k_mask(offs_k, rem, EVEN_K: tl.constexpr):
    """offs_k < rem: the K columns of a tile that exist (rem <= 0: none, the load is skipped). EVEN_K
    (K a multiple of the tile): one scalar test, so the loads stay 16-byte vectors."""
    if EVEN_K:
        return tl.broadcast_to(rem > 0, offs_k.shape)
    else:  # an explicit else: a compiled constexpr if checks a trailing return against the branch's
        return offs_k < rem


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr, N, K, num_experts,
    stride_xm, stride_we, stride_wn, stride_hm,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """h[pair, n-block] = silu(x[token] @ gate^T) * (x[token] @ up^T) for the pair's expert.

    Grid (pairs, cdiv(N, BLOCK_N)); w [E, 2N, K] (gate rows, then up rows). The next K tile's gate
    and up rows are loaded before the current tile is reduced (two tiles in flight per program; past
    the last tile the load is masked off). A pair whose expert lies outside [0, E) (another rank's)
    writes nothing: the down launch skips it. PDL: launched while the router runs, each program waits
    for the router to end (it reads the ids) and only then lets the down launch start. The down launch
    reads the ids and routing weights before its own wait, and a launch's wait covers the launch just
    before it alone: were the down launch free to start before the router ends (this launch signalling
    first, as it did until the eleventh session), it could read the previous layer's routing."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    expert = tl.load(ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm + offs_k
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    u_ptrs = g_ptrs + N * stride_wn
    mask = mask_n[:, None] & _k_mask(offs_k, K, EVEN_K)[None, :]
    g_next = tl.load(g_ptrs, mask=mask, other=0.0)
    u_next = tl.load(u_ptrs, mask=mask, other=0.0)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = g_next.to(tl.float32)
        u = u_next.to(tl.float32)
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        mask = mask_n[:, None] & _k_mask(offs_k, K - k0 - BLOCK_K, EVEN_K)[None, :]
        g_next = tl.load(g_ptrs, mask=mask, other=0.0)
        u_next = tl.load(u_ptrs, mask=mask, other=0.0)
        xv = tl.load(x_ptrs + k0, mask=_k_mask(offs_k, K - k0, EVEN_K), other=0.0).to(tl.float32)
        acc_g += tl.sum(g * xv[None, :], axis=1)
        acc_u += tl.sum(u * xv[None, :], axis=1)
    out_ty = h_ptr.dtype.element_ty
    g = acc_g.to(out_ty).to(tl.float32)
    u = acc_u.to(out_ty).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + pair.to(tl.int64) * stride_hm + offs_n, h.to(out_ty), mask=mask_n)


@triton.jit
def _moe_gemv_down_kernel(
    h_ptr, w_ptr, out_ptr, topk_w_ptr, ids_ptr, N, K, num_experts,
    stride_hm, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[token, n-block] = sum over the token's k slots of round(topk_w * (h[pair] @ w2[expert]^T)).

    Grid (tokens, cdiv(N, BLOCK_N)); w [E, N, K]. One program holds all k slots: each K step loads a
    [SLOTS, BLOCK_N, BLOCK_K] tile (SLOTS = k rounded up to a power of two; its BLOCK_N rows of each
    slot's expert), and the next step's tile is loaded before this one is reduced, so a program
    keeps 2 * k weight tiles in flight (a loop over the slots kept one). Each slot's product is
    rounded to the output dtype and the k of them are added in fp32, rounded once (the reference's
    order of roundings; the sum over slots is a fixed tree, deterministic). Slots of foreign experts
    (outside [0, E)) load nothing and add zero. PDL: launched while the gate/up launch still runs, the
    ids, routing weights and first weight tile are read before waiting for that launch's h (the router
    wrote the ids two launches back: the gate/up launch lets this one start only after the router has
    ended); the next launch (the residual add + norm) may start once every program here has."""
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.arange(0, SLOTS)
    pair = t * TOP_K + slot
    expert = tl.load(ids_ptr + pair, mask=slot < TOP_K, other=-1)
    valid = (slot < TOP_K) & (expert >= 0) & (expert < num_experts)
    weight = tl.load(topk_w_ptr + pair, mask=valid, other=0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = (w_ptr + tl.where(valid, expert, 0).to(tl.int64)[:, None, None] * stride_we
              + offs_n.to(tl.int64)[None, :, None] * stride_wn + offs_k[None, None, :])
    h_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_hm + offs_k[None, :]
    rows = valid[:, None, None] & (offs_n < N)[None, :, None]
    w_next = tl.load(w_ptrs, mask=rows & _k_mask(offs_k, K, EVEN_K)[None, None, :], other=0.0)
    if PDL:
        gdc_wait()  # the gate/up launch has finished and its h is visible
    acc = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wv = w_next.to(tl.float32)
        w_ptrs += BLOCK_K
        w_next = tl.load(w_ptrs, mask=rows & _k_mask(offs_k, K - k0 - BLOCK_K, EVEN_K)[None, None, :], other=0.0)
        hv = tl.load(h_ptrs + k0, mask=valid[:, None] & _k_mask(offs_k, K - k0, EVEN_K)[None, :], other=0.0)
        acc += tl.sum(wv * hv.to(tl.float32)[:, None, :], axis=2)
    out_ty = out_ptr.dtype.element_ty
    y = (acc * weight[:, None]).to(out_ty).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_n, tl.sum(y, axis=0).to(out_ty), mask=offs_n < N)


def moe_gemv_config(hidden: int, inter: int, device: torch.device) -> dict:
    """Tiles of the decode launches: BLOCK_N1 x BLOCK_K1 (gate/up, N = I, K = H) and BLOCK_N2 x
    BLOCK_K2 (down, N = H, K = I, times the k slots), from the sweep of scripts/moe_kernel_bench.py
    --tune (H100, Qwen3-30B-A3B, 1, 2 and 4 tokens: these are within 1 us of the best at each).
    256-column K tiles are one warp wide (8 bf16 a lane), so the sums over K need no shared memory;
    narrow row blocks give hundreds of programs at batch 1 (8 x 48 and 512), each with two K tiles
    in flight (explicit prefetch: Triton software-pipelines no load that feeds no dot, so num_stages
    would change nothing). PDL: the down launch is a programmatic dependent launch of the gate/up
    one (Hopper and later; ~2 us a layer; the interpreter has no grid dependency control)."""
    if device.type != "cuda":
        return dict(BLOCK_N1=16, BLOCK_K1=32, WARPS1=4, BLOCK_N2=16, BLOCK_K2=32, WARPS2=4, PDL=False)
    cfg = dict(BLOCK_N1=16, BLOCK_K1=min(256, triton.next_power_of_2(hidden)), WARPS1=8,
               BLOCK_N2=4, BLOCK_K2=min(256, triton.next_power_of_2(inter)), WARPS2=8,
               PDL=pdl_enabled(device))
    return dict(cfg, **_GEMV_TILES)


# tile overrides for the decode launches, e.g. '{"BLOCK_N1": 8}' (scripts/moe_kernel_bench.py --tune prints them)
_GEMV_TILES: dict = json.loads(os.environ.get("RTLLM_MOE_GEMV_TILES") or "{}")


def fused_experts_gemv(x, w13, w2, topk_w, ids, top_k, cfg) -> torch.Tensor:
    """The experts of T tokens with ids [T * k] (token-major) and weights topk_w: gate/up then down,
    two launches, [T, H] in x's dtype (cfg: moe_gemv_config's tiles and PDL)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    num_pairs = ids.numel()
    pdl = bool(cfg["PDL"])
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _moe_gemv_gate_up_kernel[(num_pairs, triton.cdiv(inter, cfg["BLOCK_N1"]))](
        x, w13, h, ids, inter, H, E, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"], EVEN_K=H % cfg["BLOCK_K1"] == 0, PDL=pdl,
        num_warps=cfg["WARPS1"], num_stages=1, launch_pdl=pdl,
    )  # fmt: skip
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _moe_gemv_down_kernel[(T, triton.cdiv(H, cfg["BLOCK_N2"]))](
        h, w2, out, topk_w, ids, H, inter, E, h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
        EVEN_K=inter % cfg["BLOCK_K2"] == 0, PDL=pdl, num_warps=cfg["WARPS2"], num_stages=1, launch_pdl=pdl,
    )  # fmt: skip
    return out
