"""Paged attention over a block-table KV cache.

Layout (one pool per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size +
p % block_size. Queries come flat: q[T, num_heads, head_dim] with query_start_loc[B+1]
delimiting sequences; seq_lens[B] counts every KV token of a sequence after this step
(cached prefix + new tokens), so query j of sequence b sits at position
seq_lens[b] - q_len_b + j and attends causally to positions <= that.

Where the keys and values come from: the step's own tokens (positions seq_lens[b] - q_len_b ..
seq_lens[b] - 1, a prefill chunk or a decode's one token) are read from the fresh, rotated k and v
[T, Hkv, D] of this step (the model dtype), the earlier positions (the cached prefix) from the cache.
The step's K/V are written to the cache as well (rtllm.kernels.attention_rope.rope_and_cache, before attention) for
later steps.
With a cache in the model dtype both sources hold the same values; with an FP8 cache only the prefix is
dequantized, so a prompt prefilled in one step attends exactly as with a full-precision cache, and each
later step (a decode, the next chunk) sees every earlier token as e4m3 value * scale.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rtllm.kernels.dispatch import custom_kernel, triton_enabled

#: dtype of an FP8 KV cache (QuantConfig.kv_cache_quant_algo="FP8") and its largest finite value
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0


def reshape_and_cache_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Write k, v [T, Hkv, D] into their slots; slot -1 (padding) is skipped by the caller.
    An FP8 cache stores ``quantize_kv(x, scale)`` (see there)."""
    kc = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])
    vc = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    if kc.dtype == FP8_KV_DTYPE:  # as bytes: torch's CPU index ops have no fp8 kernels
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
        k, v = quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8)
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def _select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x.index_select(0, idx), for fp8 through a byte view (no fp8 CPU kernel)."""
    if x.dtype == FP8_KV_DTYPE:
        return x.view(torch.uint8).index_select(0, idx).view(FP8_KV_DTYPE)
    return x.index_select(0, idx)


def fp32_scalar(x: float) -> float:
    """x rounded to the nearest fp32 (how a Triton kernel receives a Python float)."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The FP8 KV cache's rounding: e4m3(clamp(x * (1 / scale), -448, 448)), round to nearest even,
    with x first in its own dtype, the product in fp32 and 1 / scale rounded to fp32 (as in the Triton
    writes, which get the same inverse)."""
    inv = fp32_scalar(1.0 / fp32_scalar(scale))
    return (x.float() * inv).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached K or V in ``dtype``: an FP8 cache's values times ``scale`` (in fp32, then rounded to ``dtype``);
    any other cache is just cast."""
    if x.dtype == FP8_KV_DTYPE:
        return (x.float() * fp32_scalar(scale)).to(dtype)
    return x.to(dtype)


def gather_slots(block_tables: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """Flat slot index of positions 0..max_len-1 for every row of block_tables: [B, max_len]."""
    pos = torch.arange(max_len, device=block_tables.device)
    blocks = block_tables[:, pos // block_size].long()
    return blocks * block_size + (pos % block_size)


class PagedGather:
    """Where to gather each decode row's K/V from, computed once per step and shared by every layer.

    slots: [B * L] flat cache slots of positions 0..L-1; valid: [B, L] (position < seq_len);
    empty_rows: whether some row has seq_len 0 (a padding row); invalid: flat indices of the
    positions past each row's seq_len (computed on first use)."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, block_size: int) -> None:
        self.max_len = max_len
        self.slots = gather_slots(block_tables, max_len, block_size).reshape(-1)
        self.valid = torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None].long()
        self.empty = seq_lens == 0
        self.empty_rows = bool(self.empty.any())
        self._seq_lens = seq_lens

    @functools.cached_property
    def invalid(self) -> torch.Tensor:
        return (~self.valid).reshape(-1).nonzero().squeeze(1)

    @functools.cached_property
    def last(self) -> torch.Tensor:
        """Flat index into [B * L] of each row's newest position (a padding row's: its position 0)."""
        B = self.valid.shape[0]
        rows = torch.arange(B, device=self.valid.device)
        return rows * self.max_len + (self._seq_lens.long() - 1).clamp_min(0)

    @functools.cached_property
    def additive_mask(self) -> torch.Tensor:
        """[B, 1, L] fp32: 0 where a position is valid, -inf past the row's length."""
        mask = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        return mask.masked_fill_(~self.valid, float("-inf"))[:, None, :]


def paged_decode_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    gather: PagedGather | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    method: str = "auto",
) -> torch.Tensor:
    """One query token per sequence. q: [B, Hq, D], the step's own k, v: [B, Hkv, D] -> [B, Hq, D].
    Vectorized over the batch.

    Position seq_lens[b] - 1 (the token being decoded) is the fresh k[b], v[b]; positions before it
    come from the cache (see the module docstring). Positions >= seq_lens[b] are gathered (up to
    max_seq_len) but zeroed before the masked softmax, so whatever unwritten cache slots hold (NaN in
    a torch.empty pool) cannot leak in. A row with seq_len 0 (padding) returns zeros. ``gather``
    (from PagedGather) skips recomputing the slot indices and masks in every layer. An FP8 cache is
    read as its values times ``k_scale`` / ``v_scale`` (:func:`dequantize_kv`).

    A single row (a request decoding alone) takes one SDPA call on [1, H, L, D], as transformers'
    decode step calls it over its cache: the CPU kernel then gives transformers' bits. Several rows
    take the padded batch (K/V gathered to [B, L, Hkv, D]) in one of two ways (``method``, "auto" picks
    by :func:`padded_sdpa_pays`): "matmul", masked batched matmuls (block-diagonal up to
    BLOCK_DIAGONAL_MAX_KV_HEADS KV heads, else one per KV head), or "sdpa", one masked SDPA call over the
    padded batch (slower in bf16 at every length; scripts/cpu_decode_attention_bench.py, docs/PERF.md).
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if gather is None:
        gather = PagedGather(block_tables, seq_lens, max_seq_len, block_size)
    if B == 1 and gather.max_len > 0:
        return _decode_one_sdpa(q, k, v, k_cache, v_cache, int(seq_lens[0]), gather, scale, k_scale, v_scale)
    L = gather.max_len
    if method not in ("auto", "matmul", "sdpa"):
        raise ValueError(f"method={method!r}: must be 'auto', 'matmul' or 'sdpa'")
    if method == "auto":
        method = "sdpa" if padded_sdpa_pays(q.dtype, Hkv) else "matmul"
    if method == "matmul" and Hkv <= BLOCK_DIAGONAL_MAX_KV_HEADS:
        return _decode_block_diagonal(q, k, v, k_cache, v_cache, gather, scale, k_scale, v_scale)
    G = Hq // Hkv
    k_new, v_new = k, v
    k = _select_rows(k_cache.view(-1, Hkv, D), gather.slots).view(B, L, Hkv, D)
    v = _select_rows(v_cache.view(-1, Hkv, D), gather.slots).view(B, L, Hkv, D)
    if k.dtype == FP8_KV_DTYPE:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    if L > 0:  # a padding row's (seq_len 0) position 0 is overwritten but masked
        rows, last = torch.arange(B, device=q.device), (seq_lens.long() - 1).clamp_min(0)
        k[rows, last], v[rows, last] = k_new.to(k.dtype), v_new.to(v.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    # positions past a row's length: p is 0 there, but 0 * NaN is NaN (only those rows are zeroed)
    v.view(B * L, Hkv * D).index_fill_(0, gather.invalid, 0)
    if method != "matmul":
        # SDPA adds the mask to q.k: a NaN key (an unwritten slot) would survive it, so zero those too
        k.view(B * L, Hkv * D).index_fill_(0, gather.invalid, 0)
        out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=gather.valid[:, None, None, :], scale=scale,
                                             enable_gqa=Hq != Hkv)[:, :, 0]
        return out.masked_fill(gather.empty[:, None, None], 0.0) if gather.empty_rows else out
    # GQA without expanding K/V: the G query heads of a KV head form the rows of one small matmul.
    # Scores and softmax in fp32.
    scores = _matmul_per_kv_head(q.view(B, Hkv, G, D), k, transpose=True).float() * scale  # [B, Hkv, G, L]
    scores.masked_fill_(~gather.valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    out = _matmul_per_kv_head(probs, v, transpose=False).reshape(B, Hq, D)
    if gather.empty_rows:
        out = out.masked_fill(gather.empty[:, None, None], 0.0)
    return out


#: At most this many KV heads take the block-diagonal matmuls (_decode_block_diagonal), whose work grows
#: with the KV head count; more take one matmul per KV head over K/V copied to head-major order.
BLOCK_DIAGONAL_MAX_KV_HEADS = 4


def _decode_block_diagonal(q, k, v, k_cache, v_cache, gather: PagedGather, scale: float, k_scale: float,
                           v_scale: float) -> torch.Tensor:
    """The padded decode batch in two batched matmuls that read the gathered K/V [B, L, Hkv * D] in place
    (no head-major copy). Each query head is spread over all Hkv * D channels with zeros outside its KV
    head's D, so q_e [B, Hq, Hkv * D] @ K^T gives every head's scores at once (the zeros add nothing), and
    probs @ V [B, Hq, Hkv * D] holds each head's output in its own KV head's D channels (the diagonal
    blocks, read as a view). Hkv times the multiply-adds of per-head matmuls, but on the CPU these tiny
    matmuls cost their call overhead, not their FLOPs: 1.3-2.2x faster in bf16 than copying K/V head-major at
    Hkv = 3 (scripts/cpu_decode_attention_bench.py). Scores and softmax in fp32."""
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[2], gather.max_len
    G, C = Hq // Hkv, Hkv * D
    kf = _select_rows(k_cache.view(-1, C), gather.slots)  # [B * L, C]
    vf = _select_rows(v_cache.view(-1, C), gather.slots)
    if kf.dtype == FP8_KV_DTYPE:
        kf, vf = dequantize_kv(kf, k_scale, q.dtype), dequantize_kv(vf, v_scale, q.dtype)
    kf, vf = kf.to(q.dtype), vf.to(q.dtype)
    if L > 0:  # the step's own K/V (a padding row's position 0 is overwritten but masked)
        kf.index_copy_(0, gather.last, k.reshape(B, C).to(q.dtype))
        vf.index_copy_(0, gather.last, v.reshape(B, C).to(q.dtype))
    # positions past a row's length may hold NaN (an unwritten slot): the additive mask keeps a NaN score,
    # and p * NaN is NaN even where p is 0, so both are zeroed there
    kf.index_fill_(0, gather.invalid, 0)
    vf.index_fill_(0, gather.invalid, 0)
    qe = q.new_zeros(B, Hkv, G, Hkv, D)
    qe.diagonal(dim1=1, dim2=3).copy_(q.view(B, Hkv, G, D).permute(0, 2, 3, 1))
    scores = torch.bmm(qe.view(B, Hq, C), kf.view(B, L, C).transpose(1, 2))  # [B, Hq, L]
    probs = torch.add(gather.additive_mask, scores, alpha=scale).softmax(dim=-1).to(q.dtype)
    o = torch.bmm(probs, vf.view(B, L, C)).view(B, Hkv, G, Hkv, D)
    out = o.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B, Hq, D)
    if gather.empty_rows:
        out = out.masked_fill(gather.empty[:, None, None], 0.0)
    return out


def padded_sdpa_pays(dtype: torch.dtype, num_kv_heads: int) -> bool:
    """Whether one masked SDPA call beats the batched matmuls for a padded decode batch on the CPU:
    never in 16-bit, where torch's CPU SDPA kernel runs 1.5-7x slower than the matmuls for one query
    token; in fp32 only against the per-KV-head matmuls (SDPA was 1.1-3x faster than those at 4-16
    rows and 40-2000 positions, two cores), not against the block-diagonal ones (within 0.8-1.1x of
    SDPA; scripts/cpu_decode_attention_bench.py, docs/PERF.md)."""
    return dtype == torch.float32 and num_kv_heads > BLOCK_DIAGONAL_MAX_KV_HEADS


def _matmul_per_kv_head(a: torch.Tensor, b: torch.Tensor, transpose: bool) -> torch.Tensor:
    """a [B, Hkv, G, X] times each KV head's b [B, L, Hkv, Y] (b^T when ``transpose``: X == Y, giving
    [B, Hkv, G, L]; else X == L, giving [B, Hkv, G, Y]): GQA without expanding K/V, one batched
    matmul over [B, Hkv] (b copied to its layout first)."""
    return torch.matmul(a, b.permute(0, 2, 3, 1) if transpose else b.transpose(1, 2))


def _prefix_and_fresh(cache: torch.Tensor, slots: torch.Tensor, scale: float, fresh: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """A sequence's K or V [len(slots) + len(fresh), Hkv, D] in ``dtype``: its cached prefix at the flat
    ``slots`` of ``cache`` [slots, Hkv, D] (dequantized), then the step's fresh rows."""
    return torch.cat((dequantize_kv(_select_rows(cache, slots), scale, dtype), fresh.to(dtype)))


def _decode_one_sdpa(q, k, v, k_cache, v_cache, seq_len: int, gather: PagedGather, scale: float, k_scale: float,
                     v_scale: float) -> torch.Tensor:
    """paged_decode_attention_torch of one row (B = 1) through SDPA."""
    Hq, D = q.shape[1:]
    Hkv = k_cache.shape[2]
    if seq_len == 0:
        return torch.zeros_like(q)
    prefix = gather.slots[: seq_len - 1]
    kb = _prefix_and_fresh(k_cache.view(-1, Hkv, D), prefix, k_scale, k, q.dtype)
    vb = _prefix_and_fresh(v_cache.view(-1, Hkv, D), prefix, v_scale, v, q.dtype)
    o = F.scaled_dot_product_attention(q[:, :, None], kb.transpose(0, 1).contiguous()[None],
                                       vb.transpose(0, 1).contiguous()[None], scale=scale, enable_gqa=Hq != Hkv)
    return o[:, :, 0]


def paged_prefill_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Ragged queries with a cached prefix, causal. q: [T, Hq, D], the chunks' own k, v: [T, Hkv, D]
    -> [T, Hq, D]. Loops over sequences. Each chunk attends to its own tokens through k, v and to its
    prefix through the cache, read (FP8) as its values times ``k_scale`` / ``v_scale``."""
    T, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    kc = k_cache.view(-1, Hkv, D)
    vc = v_cache.view(-1, Hkv, D)
    for b, kv_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        ctx = kv_len - q_len
        kb, vb = k[s:e].to(q.dtype), v[s:e].to(q.dtype)
        if ctx > 0:
            slots = gather_slots(block_tables[b : b + 1], ctx, block_size)[0]
            kb = _prefix_and_fresh(kc, slots, k_scale, kb, q.dtype)
            vb = _prefix_and_fresh(vc, slots, v_scale, vb, q.dtype)
        # [1, H, L, D] as transformers calls SDPA: 3-D inputs take another CPU kernel (other bits)
        kb, vb = kb.transpose(0, 1)[None], vb.transpose(0, 1)[None]  # [1, Hkv, L, D]
        qb = q[s:e].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        if ctx == 0:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
        else:
            qpos = torch.arange(ctx, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        out[s:e] = o[0].transpose(0, 1)
    return out


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    if triton_enabled(k):
        from rtllm.kernels import triton_attention

        return triton_attention.reshape_and_cache_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return reshape_and_cache_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# Plugin kernels keep the cache-only signature (dispatch.KERNEL_SIGNATURES): they get no fresh k, v and
# no KV scales, so they serve caches in the model dtype only, where the step's K/V in the cache equal
# the fresh ones; an FP8 cache stays on rtllm's kernels.


def paged_decode_attention(q, k, v, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, gather=None,
                           k_scale=1.0, v_scale=1.0):
    fp8 = k_cache.dtype == FP8_KV_DTYPE
    if not fp8 and (fn := custom_kernel("paged_decode_attention", q)) is not None:
        return fn(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)
    if triton_enabled(q):
        from rtllm.kernels import triton_attention

        return triton_attention.paged_decode_attention_triton(
            q, k, v, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, k_scale=k_scale, v_scale=v_scale
        )
    return paged_decode_attention_torch(q, k, v, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len,
                                        gather, k_scale, v_scale)


def paged_prefill_attention(
    q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, max_seq_len,
    k_scale=1.0, v_scale=1.0,
):
    fp8 = k_cache.dtype == FP8_KV_DTYPE
    if not fp8 and (fn := custom_kernel("paged_prefill_attention", q)) is not None:
        return fn(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, max_seq_len)
    if triton_enabled(q):
        from rtllm.kernels import triton_attention

        return triton_attention.paged_prefill_attention_triton(
            q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, max_seq_len,
            k_scale=k_scale, v_scale=v_scale,
        )
    return paged_prefill_attention_torch(q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                         k_scale, v_scale)
