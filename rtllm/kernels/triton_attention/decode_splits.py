"""How flash-decoding splits a sequence's KV (decode_num_splits) and how the splits' partial softmax sums
are merged: by the split that finishes last (merge_in_last_split, in the split kernel's own launch), or
by a launch of their own (decode_reduce_kernel). rtllm.kernels.triton_attention.decode launches them."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rtllm.kernels.device_buffers import device_buffer


@triton.jit
def split_tokens_of(seq_len, num_splits, ALIGN: tl.constexpr):
    """Tokens a split of sequence b holds: its length over num_splits, rounded up to a multiple of ALIGN
    (the split kernel's KV tile). So num_splits of them cover the sequence, and a short sequence takes
    one tile a split in as many splits as it has tiles, whatever max_seq_len sized the grid (a CUDA
    graph is captured with the engine's max_seq_len: splits sized from it put a 400-token context of a
    batch-1 step at max_seq_len 8192 in 3-4 splits of 2-4 tiles, one after another)."""
    per = (seq_len + num_splits - 1) // num_splits
    return tl.maximum((per + ALIGN - 1) // ALIGN, 1) * ALIGN


@triton.jit
def splits_holding(seq_len, split_tokens, num_splits):
    """How many of the num_splits splits of split_tokens tokens hold tokens of a seq_len-token sequence
    (0 for a padding row); the others store an empty partial."""
    return tl.minimum((seq_len + split_tokens - 1) // split_tokens, num_splits)


@triton.jit(do_not_specialize=["num_splits"])
def decode_reduce_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    seq_lens_ptr,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (b, q head): merge the splits that hold tokens of sequence b (split_tokens_of, ALIGN the
    split kernel's BLOCK_N). PDL: launched while the splits run (reads after they end); the next launch
    (the o projection's GEMV) may start and stream its weights meanwhile."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + b)
    split_tokens = split_tokens_of(seq_len, num_splits, ALIGN)
    n_valid = splits_holding(seq_len, split_tokens, num_splits)
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


@triton.jit
def merge_in_last_split(out_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, b, hk, num_kv_heads, num_splits, seq_len,
                        split_tokens, stride_ob, stride_oh, stride_od, G: tl.constexpr, BLOCK_H: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        CHUNK: tl.constexpr):  # fmt: skip
    """Called by every split program of (sequence b, KV head hk) after it stored its partials: bumps the
    pair's counter (acq_rel); the program that arrives last merges the splits holding tokens of sequence
    b (splits_holding) for the G query heads as decode_reduce_kernel does (weights from the splits'
    maxima; sums in chunks of CHUNK splits, each chunk's loads in flight together), writes the output
    and resets the counter. This
    saves the reduce launch, which costs ~3.3 us a layer on the critical path at batch 1 (H100,
    Llama-3.1-8B: TPOT 5.43 -> 5.32 ms without it, scripts/launch_probe.py --skip attn_reduce); what the
    counter and the last program's tail cost instead is not yet measured."""
    tl.debug_barrier()  # every partial store of this program happens before the release below
    slot = b * num_kv_heads + hk
    done = tl.atomic_add(cnt_ptr + slot, 1, sem="acq_rel", scope="gpu")
    if done == num_splits - 1:
        n_valid = splits_holding(seq_len, split_tokens, num_splits)
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < G
        heads = hk * G + offs_h
        rows = (b.to(tl.int64) * (num_kv_heads * G) + heads) * num_splits  # partials [B, Hq, S(, D)]
        offs_s = tl.arange(0, BLOCK_S)
        mask_hs = mask_h[:, None] & (offs_s < n_valid)[None, :]
        m = tl.load(m_ptr + rows[:, None] + offs_s[None, :], mask=mask_hs, other=float("-inf"),
                    cache_modifier=".cg")
        lsum = tl.load(l_ptr + rows[:, None] + offs_s[None, :], mask=mask_hs, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, 1)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        denom = tl.sum(tl.exp2(m - m_max[:, None]) * lsum, 1)
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        tot = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, n_valid, CHUNK):
            sc = c0 + offs_c
            mask_c = mask_h[:, None] & (sc < n_valid)[None, :]
            part = rows[:, None] + sc[None, :]
            mc = tl.load(m_ptr + part, mask=mask_c, other=float("-inf"), cache_modifier=".cg")
            a = tl.load(acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                        mask=mask_c[:, :, None] & mask_d[None, None, :], other=0.0, cache_modifier=".cg")
            tot += tl.sum(a * tl.exp2(mc - m_max[:, None])[:, :, None], 1)
        o = tot / tl.where(denom > 0.0, denom, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
        tl.atomic_xchg(cnt_ptr + slot, 0)


MERGES = ("launch", "last_split")


def merge_mode(merge: str | None) -> str:
    """The merge a decode launch uses: ``merge``, else ``RTLLM_DECODE_MERGE``, else "launch". The merge in
    the last split is not yet the default: it passes the interpreter's tests, but has not yet been compiled
    and timed on a GPU (scripts/gpu_probe_bench.sh with RTLLM_DECODE_MERGE=last_split)."""
    mode = merge or os.environ.get("RTLLM_DECODE_MERGE") or "launch"
    if mode not in MERGES:
        raise ValueError(f"decode attention merge {mode!r} (argument or RTLLM_DECODE_MERGE): one of {MERGES}")
    return mode


MERGE_COUNTERS = 1 << 12  # one a (sequence, KV head); more splits than one only below the SM count


def merge_counters(device: torch.device, pairs: int) -> torch.Tensor | None:
    """The device's zeroed int32 arrival counters for merge_in_last_split (each launch leaves them at
    zero), or None where a launch of ``pairs`` (sequence, KV head) pairs cannot use them: more pairs than
    counters, or a CUDA-graph capture before they exist (rtllm.kernels.device_buffers)."""
    cnt = device_buffer("decode_merge_counters", device,
                        lambda: torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device))
    return cnt if cnt is not None and pairs <= cnt.numel() else None


DECODE_MAX_SPLITS = 64


def decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int = 132
) -> tuple[int, int]:
    """(num_splits, split_tokens) for flash-decoding: the grid's splits, and how many tokens each holds
    at max_seq_len (a sequence's own splits, split_tokens_of, hold at most that many).

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
