"""Paged attention layer: (q/k RMSNorm +) RoPE + KV-cache write + attention over the block tables."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import attention as attn_kernels
from rtllm.kernels import attention_rope as attn_rope
from rtllm.kernels.rope import RopeTables
from rtllm.layers.attention_metadata import AttentionMetadata
from rtllm.layers.norm import RMSNorm
from rtllm.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    """Multi-head / grouped-query attention over this layer's paged KV cache.

    ``k_cache`` and ``v_cache`` ([num_blocks, block_size, num_kv_heads, head_dim]) are bound
    by the ModelRunner once the pool is allocated.

    ``qk_norm``: the model's per-head (q_norm, k_norm) RMSNorms (Qwen3), applied to q and k before
    the rotation in the RoPE + cache-write kernel (one launch instead of three). They stay the
    model's modules (parameters and checkpoint names); this layer only reads their weights.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
                 qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.rotary = rotary
        self.qk_norm = qk_norm  # a tuple: not registered as submodules here
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # FP8 KV cache (float8_e4m3fn pools): cached K = e4m3(k / k_scale), read back as value * k_scale.
        # 1.0 is the static default (no calibration); unused by other cache dtypes.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq*D], k, v: [T, Hkv*D] (before the q/k norms, if any) -> [T, Hq*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        cache = self.rotary.cos_sin_cache
        norm = self._norm_args()
        nd = meta.num_decodes
        if nd == meta.num_seqs and attn_rope.rope_in_decode(q, self.k_cache, cache, norm):
            out = attn_rope.paged_decode_attention_rope(
                positions, q, k, v, cache, self.k_cache, self.v_cache, meta.slot_mapping, meta.block_tables,
                meta.seq_lens, self.scale, meta.max_decode_seq_len, self.k_scale, self.v_scale, norm)
            return out.reshape(T, self.num_heads * self.head_dim)
        # the torch path (CPU) shares per-step tables across layers; the Triton path needs none
        tables = None if q.is_cuda else meta.derived("rope", lambda: RopeTables(positions, cache))
        # the step's own K/V reach attention fresh (rotated, model dtype); the cache serves earlier steps
        q, k = attn_rope.rope_and_cache(
            positions, q, k, v, cache, self.k_cache, self.v_cache, meta.slot_mapping, tables, self.k_scale,
            self.v_scale, norm,
        )
        if nd == meta.num_seqs:
            bs = self.k_cache.shape[1]
            gather = None if q.is_cuda else meta.derived("decode_gather", lambda: attn_kernels.PagedGather(
                meta.block_tables, meta.seq_lens, meta.max_decode_seq_len, bs))
            out = attn_kernels.paged_decode_attention(
                q, k, v, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, self.scale,
                meta.max_decode_seq_len, gather, self.k_scale, self.v_scale)
        elif nd == 0:
            out = attn_kernels.paged_prefill_attention(
                q, k, v, self.k_cache, self.v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                self.scale, meta.max_query_len, meta.max_seq_len, self.k_scale, self.v_scale,
            )
        else:
            out = torch.empty_like(q)
            bs = self.k_cache.shape[1]
            gather = None if q.is_cuda else meta.derived("decode_gather", lambda: attn_kernels.PagedGather(
                meta.block_tables[:nd], meta.seq_lens[:nd], meta.max_decode_seq_len, bs))
            out[:nd] = attn_kernels.paged_decode_attention(
                q[:nd], k[:nd], v[:nd], self.k_cache, self.v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                self.scale, meta.max_decode_seq_len, gather, self.k_scale, self.v_scale)
            out[nd:] = attn_kernels.paged_prefill_attention(
                q[nd:], k[nd:], v[nd:], self.k_cache, self.v_cache, meta.block_tables[nd:],
                meta.prefill_query_start_loc, meta.seq_lens[nd:], self.scale, meta.max_query_len, meta.max_seq_len,
                self.k_scale, self.v_scale,
            )
        return out.reshape(T, self.num_heads * self.head_dim)

    def _norm_args(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.qk_norm is None:
            return None
        q_norm, k_norm = self.qk_norm
        assert q_norm.eps == k_norm.eps, "q_norm and k_norm share one eps"
        return q_norm.weight, k_norm.weight, q_norm.eps

    def cached_keys(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """k [T, Hkv*D] as forward() caches it before any FP8 quantization: k-normed (if the layer has
        q/k norms) and rotated; [T, Hkv, D] (the torch reference path, for calibration)."""
        k = k.reshape(k.shape[0], self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            k = self.qk_norm[1](k)
        return self.rotary.rotate(positions, k)
