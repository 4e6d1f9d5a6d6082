"""Triton token sampling: temperature, top-k, top-p, min-p and the exponential race, without a sort.

Semantics are those of :mod:`rtllm.kernels.sampling` (``sample_tokens_torch``): given the same
noise ``q`` the kernel picks the same token, except where the reference's sort order splits a run
of tied logits at the top-p cut (the kernel keeps the whole run) and where two candidates' scores
agree to the last bits (the sums and ``exp`` are not rounded in the reference's order).

One program samples one row, in a few passes over the row's logits (``V`` elements, ``BLOCK`` at a
time; the temperature division is redone in every pass, IEEE-rounded as in the reference):

1. max ``m``, min, and the smallest of the tiles' maxima (a lower bound of the k-th largest value
   when k <= number of tiles). Greedy rows (temperature 0) only take the argmax here.
2. top-k: the k-th largest value ``tau_k`` = the smallest row value v with #(x > v) < k.
3. top-p: on what top-k kept, ``tau_p`` = the smallest value v whose mass at or below it
   (sum of exp(x - m) over tau_k <= x <= v) exceeds (1 - top_p) * Z; the reference drops exactly the
   tokens whose ascending cumulative probability is <= 1 - top_p. Tokens with
   exp(x - m) <= (1 - top_p) / V can never be kept, which bounds the search from below.
4. min-p and the race: among x >= max(tau_k, tau_p) with exp(x - m) >= min_p (the reference's
   ``prob < min_p * max prob``, the normalizer cancelled), the token maximizing exp(x - m) / q.

Steps 2 and 3 find "the smallest row value v where a monotone predicate F holds" by a bounded
search: the interval [lo, hi] (all values below lo fail, tau <= hi) is cut at P pivots spread
evenly over the *ordered int32 keys* of the floats between lo and hi (so each pass shrinks the key
range P-fold whatever the values' magnitudes: at most ceil(32 / log2 P) + 1 passes), one pass
evaluates F at every pivot, and the interval is also snapped to the smallest and largest row value
inside it, which ends the search as soon as one value is left (usually after a few passes: the
cut-offs lie in the sparse top of the distribution). Only tiles holding a value inside the
interval do the [BLOCK, P] pivot work; the others cost one load and a few 1-D reductions.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NUM_PIVOTS = 8
MAX_PASSES = 24  # > ceil(32 / log2(NUM_PIVOTS)) + 1; a guard, never reached
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (-0.0 just below +0.0; -inf lowest, +inf highest)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _scaled(x_row, offs, V, t):
    """A tile of the row divided by the temperature (IEEE division, as torch); -inf past the end."""
    mask = offs < V
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, tl.div_rn(x, t), float("-inf"))


@triton.jit
def _search(x_row, V, t, m, lo, hi, floor, target,
            MASS: tl.constexpr, BLOCK: tl.constexpr, P: tl.constexpr, PASSES: tl.constexpr):
    """The smallest row value v (of x >= floor) where F(v) holds, F monotone in v.

    MASS=False: F(v) = #(x > v) < target (top-k: the target-th largest value).
    MASS=True: F(v) = sum(exp(x - m), floor <= x <= v) > target * sum(exp(x - m), x >= floor).
    Requires: every value < lo fails F, hi is a row value where F holds. Partial sums, minima and
    maxima stay per lane across the tiles (one cross-warp reduction per pass, not per tile).
    """
    offs0 = tl.arange(0, BLOCK)
    jj = tl.arange(0, P)
    n = 0
    while (lo < hi) & (n < PASSES):
        klo = _key(lo).to(tl.int64)
        khi = _key(hi).to(tl.int64)
        piv = _unkey((klo + (khi - klo) * jj // P).to(tl.int32))  # piv[0] == lo, all < hi
        agg = tl.zeros([BLOCK, P], dtype=tl.float32)  # F's sum at each pivot, values in [lo, hi]
        base = tl.zeros([BLOCK], dtype=tl.float32)  # F's sum, values outside [lo, hi]
        z = tl.zeros([BLOCK], dtype=tl.float32)
        vmin = tl.full([BLOCK], float("inf"), tl.float32)
        vmax = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            x = _scaled(x_row, start + offs0, V, t)
            if MASS:
                x = tl.where(x >= floor, x, float("-inf"))
            inr = (x >= lo) & (x <= hi)
            vmin = tl.minimum(vmin, tl.where(inr, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(inr, x, float("-inf")))
            if MASS:
                e = tl.exp(x - m)
                z += e
                base += tl.where(x < lo, e, 0.0)  # at or below every pivot
                if tl.max(inr.to(tl.int32), axis=0) > 0:  # the [BLOCK, P] work only where needed
                    agg += tl.where((x[:, None] <= piv[None, :]) & inr[:, None], e[:, None], 0.0)
            else:
                base += (x > hi).to(tl.float32)  # above every pivot
                if tl.max(inr.to(tl.int32), axis=0) > 0:
                    agg += ((x[:, None] > piv[None, :]) & inr[:, None]).to(tl.float32)
        total = tl.sum(base, axis=0) + tl.sum(agg, axis=0)
        if MASS:
            ok = total > target * tl.sum(z, axis=0)
        else:
            ok = total < target
        j = tl.min(tl.where(ok, jj, P), axis=0)  # first pivot where F holds (P: none)
        sub_hi = tl.max(tl.where(jj == j, piv, float("-inf")), axis=0)
        sub_lo = tl.max(tl.where(jj == j - 1, piv, float("-inf")), axis=0)
        # tau is in (piv[j-1], piv[j]] and between the smallest and largest value in [lo, hi]
        vmax_s = tl.max(vmax, axis=0)
        new_hi = tl.where(j < P, tl.minimum(sub_hi, vmax_s), vmax_s)
        new_lo = tl.where(j > 0, tl.maximum(_unkey(_key(sub_lo) + 1), tl.min(vmin, axis=0)), tl.min(vmin, axis=0))
        lo = tl.minimum(new_lo, new_hi)
        hi = new_hi
        n += 1
    return lo


@triton.jit
def _argmax_update(best, idx, s, start):
    """Per-lane running max and its first index (tiles come in increasing order)."""
    better = s > best
    return tl.where(better, s, best), tl.where(better, start, idx)


@triton.jit
def _argmax_finish(best, idx, offs0):
    """The first index of the maximum over all lanes."""
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, idx + offs0, 2147483647), axis=0)


@triton.jit
def _sample_kernel(
    x_ptr, q_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, out_ptr, cut_ptr,
    stride_x, stride_q, V, log_v, tiny,
    BLOCK: tl.constexpr, P: tl.constexpr, PASSES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs0 = tl.arange(0, BLOCK)
    t = tl.load(temp_ptr + row).to(tl.float32)
    cut = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    idx = tl.zeros([BLOCK], dtype=tl.int32)
    if t == 0.0:  # greedy: the first index of the raw maximum
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            best, idx = _argmax_update(best, idx, x, start)
    else:
        mx = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the max of its column of tiles
        mn = tl.full([BLOCK], float("inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            x = _scaled(x_row, offs, V, t)
            mx = tl.maximum(mx, x)
            mn = tl.minimum(mn, tl.where(offs < V, x, float("inf")))
        m = tl.max(mx, axis=0)
        k = tl.load(topk_ptr + row).to(tl.int64)
        if (k > 1) & (k < V):
            # the lanes' maxima are min(V, BLOCK) row values >= their minimum
            lanes = tl.minimum(V, BLOCK)
            col_min = tl.min(tl.where(offs0 < V, mx, float("inf")), axis=0)
            lo = tl.where(k <= lanes, col_min, tl.min(mn, axis=0))
            cut = _search(x_row, V, t, m, lo, m, cut, k.to(tl.float32), False, BLOCK, P, PASSES)
        elif k == 1:
            cut = m
        p = tl.load(topp_ptr + row).to(tl.float64)
        if p < 1.0:
            thr = (1.0 - p).to(tl.float32)
            # exp(x - m) <= thr / V can never be kept (Z >= 1); 5% of margin for rounding
            lo = tl.maximum(cut, m + (tl.log(thr) - log_v) - 0.05)
            cut = _search(x_row, V, t, m, lo, m, cut, thr, True, BLOCK, P, PASSES)
        min_p = tl.load(minp_ptr + row).to(tl.float32)
        best = tl.full([BLOCK], -1.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            x = _scaled(x_row, offs, V, t)
            q = tl.load(q_row + offs, mask=offs < V, other=1.0).to(tl.float32)
            e = tl.exp(x - m)
            keep = (x >= cut) & (e >= min_p) & (offs < V)
            best, idx = _argmax_update(best, idx, tl.where(keep, e / tl.maximum(q, tiny), -1.0), start)
    tl.store(out_ptr + row, _argmax_finish(best, idx, offs0).to(tl.int64))
    tl.store(cut_ptr + row, cut)


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    q: torch.Tensor,
    *,
    return_cutoff: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] ([B] int64, on its device); see rtllm.kernels.sampling.

    ``return_cutoff`` also returns, per row, the scaled-logit value below which top-k / top-p drop
    tokens ([B] float32; -inf when neither applies or the row is greedy). Grid: one program per
    row. No host synchronization.
    """
    assert logits.dim() == 2 and q.shape == logits.shape
    B, V = logits.shape
    dev = logits.device
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    q = q if q.stride(1) == 1 else q.contiguous()
    temperature = temperature.to(dev, torch.float32).contiguous()
    top_k = top_k.to(dev, torch.int64).contiguous()
    top_p = (top_p if top_p.dtype in (torch.float32, torch.float64) else top_p.float()).to(dev).contiguous()
    min_p = min_p.to(dev, torch.float32).contiguous()
    out = torch.empty(B, dtype=torch.int64, device=dev)
    cut = torch.empty(B, dtype=torch.float32, device=dev)
    if B > 0:
        block = min(1024, triton.next_power_of_2(V))
        # 1024 x 16 warps: ~100 registers a thread without spills (sm_90), 8 elements a thread
        warps = 16 if block >= 1024 else max(1, block // 64)
        _sample_kernel[(B,)](
            x, q, temperature, top_k, top_p, min_p, out, cut, x.stride(0), q.stride(0), V, math.log(V), _TINY,
            BLOCK=block, P=NUM_PIVOTS, PASSES=MAX_PASSES, num_warps=warps,
        )  # fmt: skip
    return (out, cut) if return_cutoff else out


# --------------------------------------------------------------------------------------------
# greedy: argmax over long rows, split across programs


@triton.jit
def _argmax_chunk_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, S, CHUNK: tl.constexpr):
    """Program (row, chunk): the chunk's largest value and its first index (NaN counts as +inf)."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    m = tl.max(x, 0)
    i = tl.min(tl.where(x == m, offs, V), 0)  # the first index holding the maximum
    tl.store(val_ptr + row * S + c, m)
    tl.store(idx_ptr + row * S + c, i)


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, S, BLOCK_S: tl.constexpr):
    """Program (row): the first chunk holding the row's maximum gives the row's first argmax."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    v = tl.load(val_ptr + row * S + offs, mask=offs < S, other=float("-inf"))
    i = tl.load(idx_ptr + row * S + offs, mask=offs < S, other=0)
    m = tl.max(v, 0)
    first = tl.min(tl.where(v == m, offs, BLOCK_S), 0)
    tl.store(out_ptr + row, tl.sum(tl.where(offs == first, i, 0), 0).to(tl.int64))


ARGMAX_CHUNK = 2048


def argmax_triton(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for x [B, V] (int64 [B]): the first index of each row's maximum, a NaN
    counting as the maximum (as torch's). Two launches: (B, V / 2048) programs take their chunk's
    maximum and its first index, one program per row merges them. torch's argmax reduces a row in
    one block of threads, ~28 us for a 128k vocabulary row on an H100; this spreads it over the SMs."""
    B, V = x.shape
    S = triton.cdiv(V, ARGMAX_CHUNK)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    vals = torch.empty((B, S), dtype=torch.float32, device=x.device)
    idx = torch.empty((B, S), dtype=torch.int32, device=x.device)
    _argmax_chunk_kernel[(B, S)](x, vals, idx, V, x.stride(0), S, CHUNK=ARGMAX_CHUNK, num_warps=4)
    _argmax_merge_kernel[(B,)](vals, idx, out, S, BLOCK_S=max(16, triton.next_power_of_2(S)), num_warps=4)
    return out
