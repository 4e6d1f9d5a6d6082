"""Triton paged attention: flash-decoding, varlen causal prefill, and KV-cache writes.

Layouts and semantics are those of the torch references in :mod:`rtllm.kernels.attention`:

- ``k_cache``, ``v_cache``: [num_blocks, block_size, Hkv, D] (bf16, fp16, fp32 or float8_e4m3fn;
  any strides). Position p of sequence b lives in block ``block_tables[b, p // block_size]`` at row
  ``p % block_size``. Block ids need not be contiguous or ordered; only the entries covering
  positions < seq_lens[b] are ever read.
- ``q``: decode [B, Hq, D]; prefill flat [T, Hq, D] with ``query_start_loc`` [B+1] int32.
  ``seq_lens`` [B] int32 counts cached prefix + new tokens, so query j of sequence b sits at
  position ``seq_lens[b] - q_len_b + j`` and attends to positions <= that.
- ``k``, ``v``: the step's own keys and values (decode [B, Hkv, D], prefill [T, Hkv, D], rotated,
  q's dtype, as rope_and_cache returns them). The new tokens' positions are read from them, never
  from the cache; only the cached prefix (positions < ``seq_lens[b] - q_len_b``) is read through
  the block table, so an FP8 (float8_e4m3fn) cache dequantizes the prefix only.
- GQA: query head h reads KV head ``h // (Hq // Hkv)`` (as ``enable_gqa`` / repeat_interleave).
- Softmax statistics and accumulators are fp32; QK^T and PV run on tensor cores, over the prefix
  in the cache dtype (fp16 for an FP8 cache and a 16-bit q; fp32 caches use IEEE fp32 dots, not
  TF32), over a prefill chunk's own tokens in q's dtype; a decode's own token is an fp32 FMA dot.
  Outputs have q's dtype.
- A sequence with seq_len 0 (a padding row) gets an all-zero output instead of NaN.

No kernel here syncs with the host: grids come from shapes and the caller's max lengths, so
they can be captured in CUDA graphs.
"""

from rtllm.kernels.triton_attention.cache import reshape_and_cache_triton, rope_and_cache_triton
from rtllm.kernels.triton_attention.common import sm_count
from rtllm.kernels.triton_attention.decode import DECODE_MAX_SPLITS, decode_num_splits, paged_decode_attention_triton
from rtllm.kernels.triton_attention.prefill import paged_prefill_attention_triton

__all__ = [
    "DECODE_MAX_SPLITS",
    "sm_count",
    "decode_num_splits",
    "paged_decode_attention_triton",
    "paged_prefill_attention_triton",
    "reshape_and_cache_triton",
    "rope_and_cache_triton",
]
