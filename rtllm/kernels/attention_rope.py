"""RoPE and the KV-cache write of the attention layer: ``rope_and_cache`` (q and k rotated, after Qwen3's
per-head q/k RMSNorm where the model has it, and the rotated k and v written to the paged cache), as the torch
reference on the CPU and one Triton launch on CUDA; and for a pure-decode step on CUDA, optionally
(``RTLLM_DECODE_ROPE=fused``), the same done inside the decode attention kernel (:func:`rope_in_decode`,
:func:`paged_decode_attention_rope`; rtllm.kernels.triton_attention.decode_rope)."""

from __future__ import annotations

import os

import torch

from rtllm.kernels.attention import FP8_KV_DTYPE, reshape_and_cache_torch
from rtllm.kernels.dispatch import custom_kernel, triton_enabled


def rope_and_cache_torch(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, tables=None,
                         k_scale=1.0, v_scale=1.0, qk_norm=None):
    """Rotate q and k (RoPE), write rotated k and v into the paged cache; return rotated q, k.
    ``tables`` (rope.RopeTables of this step's positions) skips rebuilding them in every layer.
    ``qk_norm`` = (q_weight, k_weight, eps): q and k RMS-normalized per head first."""
    from rtllm.kernels.norm import rms_norm_torch
    from rtllm.kernels.rope import apply_rope_torch

    if qk_norm is not None:
        q, k = rms_norm_torch(q, qk_norm[0], qk_norm[2]), rms_norm_torch(k, qk_norm[1], qk_norm[2])
    q, k = apply_rope_torch(positions, q, k, cos_sin_cache, tables)
    reshape_and_cache_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k


def rope_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, tables=None,
                   k_scale=1.0, v_scale=1.0, qk_norm=None):
    """q: [T, Hq, D], k, v: [T, Hkv, D]. Returns (rotated q, rotated k); the cache gets rotated k, v
    (quantized with k_scale / v_scale when it is FP8). ``qk_norm`` = (q_weight [D], k_weight [D], eps):
    each head of q and k is RMS-normalized first (Qwen3), in the same launch on CUDA; a plugin's
    "rms_norm" kernel, if registered, normalizes them instead (then two launches more)."""
    if qk_norm is not None and custom_kernel("rms_norm", q) is not None:
        from rtllm.kernels.norm import rms_norm

        q, k = rms_norm(q, qk_norm[0], qk_norm[2]), rms_norm(k, qk_norm[1], qk_norm[2])
        qk_norm = None
    if triton_enabled(q):
        from rtllm.kernels import triton_attention

        return triton_attention.rope_and_cache_triton(
            positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale, qk_norm
        )
    return rope_and_cache_torch(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, tables,
                                k_scale, v_scale, qk_norm)


DECODE_ROPE_MODES = ("separate", "fused")


def decode_rope_mode() -> str:
    """``RTLLM_DECODE_ROPE``: "separate" (the default: RoPE + cache write, then decode attention) or "fused"
    (a pure-decode step's RoPE, q/k norms and cache write inside the decode attention kernel; written and
    tested in the interpreter, not yet compiled and timed on a GPU: scripts/gpu_probe_bench.sh VARIANT)."""
    mode = os.environ.get("RTLLM_DECODE_ROPE") or "separate"
    if mode not in DECODE_ROPE_MODES:
        raise ValueError(f"RTLLM_DECODE_ROPE={mode!r}: one of {DECODE_ROPE_MODES}")
    return mode


def rope_in_decode(q: torch.Tensor, k_cache: torch.Tensor, cos_sin_cache: torch.Tensor, qk_norm=None) -> bool:
    """Whether a pure-decode step on q's device runs RoPE (and ``qk_norm``) and the cache write inside the
    decode attention kernel (:func:`paged_decode_attention_rope`): Triton on, RTLLM_DECODE_ROPE=fused, no
    plugin kernel that the separate launches would call, a cos / sin table with contiguous rows, and
    contiguous norm weights that do not widen q's dtype."""
    if not triton_enabled(q) or decode_rope_mode() != "fused" or cos_sin_cache.stride(-1) != 1:
        return False
    if k_cache.dtype != FP8_KV_DTYPE and custom_kernel("paged_decode_attention", q) is not None:
        return False
    return qk_norm is None or (custom_kernel("rms_norm", q) is None
                               and all(w.stride(0) == 1 and torch.promote_types(q.dtype, w.dtype) == q.dtype
                                       for w in qk_norm[:2]))


def paged_decode_attention_rope(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, block_tables,
                                seq_lens, scale, max_seq_len, k_scale=1.0, v_scale=1.0, qk_norm=None):
    """rope_and_cache, then paged_decode_attention, in one launch (where :func:`rope_in_decode`): q [B, Hq, D]
    and k, v [B, Hkv, D] as the projection gives them (before RoPE and the q/k norms)."""
    from rtllm.kernels import triton_attention
    from rtllm.kernels.triton_attention.decode_rope import DecodeRope

    return triton_attention.paged_decode_attention_triton(
        q, k, v, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, k_scale=k_scale, v_scale=v_scale,
        rope=DecodeRope(positions, cos_sin_cache, slot_mapping, qk_norm),
    )
