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
from rtllm.kernels.triton_moe_routing import RouterLogits

__all__ = ["fused_experts_gemv", "moe_gemv_config", "routed_experts_gemv"]


@triton.jit
def _k_mask(offs_k, rem, EVEN_K: tl.constexpr):
    """offs_k < rem: the K columns of a tile that exist (rem <= 0: none, the load is skipped). EVEN_K
    (K a multiple of the tile): one scalar test, so the loads stay 16-byte vectors."""
    if EVEN_K:
        return tl.broadcast_to(rem > 0, offs_k.shape)
    else:  # an explicit else: a compiled constexpr if checks a trailing return against the branch's
        return offs_k < rem


@triton.jit
def _row_logits(part_ptr, t, E, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                REP: tl.constexpr, dtype):  # fmt: skip
    """Token t's router logits from the router's partial sums (triton_moe_routing.RouterLogits), as a
    [REP, BLOCK_E] tile of REP equal rows: the splits added in order and rounded to dtype, as the router
    launch's routing step does; -inf past E. With REP = the program's warps each warp holds a whole row,
    so _route_rows reduces within warps (shuffles, no shared memory or barrier). Read through L2 (.cg):
    the router launch wrote them after this SM may have cached the addresses in an earlier kernel."""
    offs_e = tl.arange(0, BLOCK_E)[None, :] + tl.zeros((REP, 1), dtype=tl.int32)
    tot = tl.zeros((REP, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(SPLIT):
        tot += tl.load(part_ptr + (j * BLOCK_T + t) * BLOCK_E + offs_e, mask=offs_e < E, other=0.0,
                       cache_modifier=".cg")
    return tl.where(offs_e < E, tot.to(dtype).to(tl.float32), float("-inf"))


@triton.jit
def _route_rows(logits, TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(ids [REP, BLOCK_K], weights [REP, BLOCK_K]) of the rows of logits [REP, BLOCK_E] (-inf past E): k
    rounds of argmax over e = exp(logit - max) (best first, ties to the lower expert id), weights
    e / sum(e) (the softmax), optionally renormalized over the k; slots >= TOP_K: id 0, weight 0. The
    selection is a function of the logits' values alone (no sum enters it), so the gate/up and the down
    launch pick the same experts; as fused_topk_triton picks them, but for exact ties of e between unequal
    logits (both underflowing to 0, far below the top k). Small tiles: a [BLOCK_E, BLOCK_E] rank
    comparison doubled the GEMV launches' registers and halved their occupancy."""
    offs_e = tl.arange(0, BLOCK_E)[None, :]
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    rest = e
    ids = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    vals = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        val, best = tl.max(rest, axis=1, return_indices=True, return_indices_tie_break_left=True)
        ids = tl.where(offs_k == j, best.to(tl.int32)[:, None], ids)
        vals = tl.where(offs_k == j, val[:, None], vals)
        rest = tl.where(offs_e == best[:, None], -1.0, rest)
    vals = vals / tl.sum(e, axis=1)[:, None]
    if RENORM:
        vals = vals / tl.sum(vals, axis=1)[:, None]
    return ids, vals


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr, N, K, num_experts, expert_start, router_experts,
    stride_xm, stride_we, stride_wn, stride_hm,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ROUTED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, REP: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """h[pair, n-block] = silu(x[token] @ gate^T) * (x[token] @ up^T) for the pair's expert.

    Grid (pairs, cdiv(N, BLOCK_N)); w [E, 2N, K] (gate rows, then up rows). The next K tile's gate
    and up rows are loaded before the current tile is reduced (two tiles in flight per program; past
    the last tile the load is masked off). A pair whose expert lies outside [0, E) (another rank's)
    writes nothing: the down launch skips it. ROUTED: ids_ptr holds the router's partial logits
    (RouterLogits, of router_experts experts) and the program routes its token itself: its expert is
    slot pair % TOP_K's, less expert_start (this rank's first expert).
    PDL: launched while the router runs, it waits for the router to end, and only then lets the down
    launch start: the down launch reads the router's output before its own wait, which covers this
    launch alone (a launch's wait does not reach the launch two back)."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if ROUTED:
        logits = _row_logits(ids_ptr, pair // TOP_K, router_experts, SPLIT, BLOCK_T, BLOCK_E, REP,
                             x_ptr.dtype.element_ty)
        ids, _ = _route_rows(logits, TOP_K, False, BLOCK_E, SLOTS)  # (the weights are dead code here)
        expert = tl.max(tl.sum(tl.where(tl.arange(0, SLOTS)[None, :] == pair % TOP_K, ids, 0), axis=1), axis=0)
        expert -= expert_start
    else:
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
    h_ptr, w_ptr, out_ptr, topk_w_ptr, ids_ptr, N, K, num_experts, expert_start, router_experts,
    stride_hm, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, ROUTED: tl.constexpr, RENORM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, REP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[token, n-block] = sum over the token's k slots of round(topk_w * (h[pair] @ w2[expert]^T)).

    Grid (tokens, cdiv(N, BLOCK_N)); w [E, N, K]. One program holds all k slots: each K step loads a
    [SLOTS, BLOCK_N, BLOCK_K] tile (SLOTS = k rounded up to a power of two; its BLOCK_N rows of each
    slot's expert), and the next step's tile is loaded before this one is reduced, so a program
    keeps 2 * k weight tiles in flight (a loop over the slots kept one). Each slot's product is
    rounded to the output dtype and the k of them are added in fp32, rounded once (the reference's
    order of roundings; the sum over slots is a fixed tree, deterministic). Slots of foreign experts
    (outside [0, E)) load nothing and add zero. ROUTED: ids_ptr holds the router's partial logits and
    the program routes its token as the gate/up launch did (the same slots, and the weights).
    PDL: launched while the gate/up launch still runs, the ids (or the router's logits) and the first
    weight tile are read before waiting for that launch's h: the gate/up launch lets this one start
    only after the router has ended. The next launch (the residual add + norm) may start once every
    program here has."""
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.arange(0, SLOTS)
    pair = t * TOP_K + slot
    if ROUTED:
        logits = _row_logits(ids_ptr, t, router_experts, SPLIT, BLOCK_T, BLOCK_E, REP, h_ptr.dtype.element_ty)
        ids, weight = _route_rows(logits, TOP_K, RENORM, BLOCK_E, SLOTS)
        expert = tl.max(ids, axis=0) - expert_start  # the REP rows are equal
        weight = tl.max(weight, axis=0)
        valid = (slot < TOP_K) & (expert >= 0) & (expert < num_experts)
        weight = tl.where(valid, weight, 0.0)
    else:
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
    return _launch(x, w13, w2, topk_w, ids, top_k, cfg)


def routed_experts_gemv(x, w13, w2, logits: RouterLogits, top_k: int, renormalize: bool, expert_start: int,
                        cfg) -> torch.Tensor:
    """fused_experts_gemv of the routing in ``logits`` (the router launch's partial sums for x's T
    tokens): the two launches route each token themselves, so no routing step or ids lie between the
    router and the experts. ``expert_start``: the global id of w13's first expert (expert parallel;
    other experts contribute zero)."""
    assert logits.block_t >= x.shape[0] and logits.dtype == x.dtype, (logits.block_t, x.shape, logits.dtype)
    return _launch(x, w13, w2, logits.part, logits.part, top_k, cfg, logits, renormalize, expert_start)


def _launch(x, w13, w2, topk_w, ids, top_k, cfg, logits: RouterLogits | None = None, renormalize: bool = False,
            expert_start: int = 0) -> torch.Tensor:
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    num_pairs = T * top_k
    pdl = bool(cfg["PDL"])
    routed = logits is not None
    router = dict(ROUTED=routed, SPLIT=logits.split if routed else 1, BLOCK_T=logits.block_t if routed else 1,
                  BLOCK_E=logits.block_e if routed else 1)
    router_experts = logits.num_experts if routed else E
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _moe_gemv_gate_up_kernel[(num_pairs, triton.cdiv(inter, cfg["BLOCK_N1"]))](
        x, w13, h, ids, inter, H, E, expert_start, router_experts, x.stride(0), w13.stride(0), w13.stride(1),
        h.stride(0), TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"], EVEN_K=H % cfg["BLOCK_K1"] == 0,
        PDL=pdl, REP=cfg["WARPS1"], num_warps=cfg["WARPS1"], num_stages=1, launch_pdl=pdl, **router,
    )  # fmt: skip
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _moe_gemv_down_kernel[(T, triton.cdiv(H, cfg["BLOCK_N2"]))](
        h, w2, out, topk_w, ids, H, inter, E, expert_start, router_experts, h.stride(0), w2.stride(0),
        w2.stride(1), out.stride(0), TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=cfg["BLOCK_N2"],
        BLOCK_K=cfg["BLOCK_K2"], EVEN_K=inter % cfg["BLOCK_K2"] == 0, RENORM=renormalize, PDL=pdl,
        REP=cfg["WARPS2"], num_warps=cfg["WARPS2"], num_stages=1, launch_pdl=pdl, **router,
        **({"maxnreg": cfg["MAXNREG2"]} if cfg.get("MAXNREG2") else {}),
    )  # fmt: skip
    return out
