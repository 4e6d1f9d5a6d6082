"""Paged prefill attention (varlen, causal, cached prefix): reference vs the dense oracle, Triton vs
the reference (helpers and the method: tests/kernels/paged.py)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import attention as ref
from rtllm.kernels import triton_attention as tri
from tests.kernels.paged import BS, DTYPES, HEADS, REF_CASES, Paged, close


@pytest.mark.parametrize("case", REF_CASES)
def test_prefill_reference_matches_dense_oracle(case) -> None:
    p = Paged(*case, dtype=torch.float32)
    p.poison_new_slots()
    out = ref.paged_prefill_attention_torch(
        p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens_t, p.scale
    )
    torch.testing.assert_close(out.double(), p.dense(), atol=1e-5, rtol=1e-5)





def run_prefill(p: Paged, q: torch.Tensor | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    q = p.q if q is None else q
    args = (q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens_t, p.scale)
    out = tri.paged_prefill_attention_triton(*args, max(p.q_lens), max(p.seq_lens), **kw)
    return out, ref.paged_prefill_attention_torch(*args)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_ragged(heads, dtype) -> None:
    """Fresh prompts of lengths 1, bs-1, bs, bs+1 and several blocks in one batch."""
    p = Paged([0] * 5, [1, BS - 1, BS, BS + 1, 3 * BS + 5], *heads, BS, dtype)
    out, expected = run_prefill(p)
    close(out, expected, dtype)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_chunked_with_cached_prefix(heads, dtype) -> None:
    """Chunks after a cached prefix (ctx > 0, q_len > 1), mixed with a decode-like row."""
    p = Paged([5, BS, BS + 3, 2 * BS + 1], [7, BS + 1, 1, 20], *heads, BS, dtype, seed=1)
    out, expected = run_prefill(p)
    close(out, expected, dtype)
    if dtype == torch.float32:  # and the reference is the oracle here too
        torch.testing.assert_close(expected.double(), p.dense(), atol=1e-5, rtol=1e-5)


def test_new_tokens_read_fresh_not_from_the_cache() -> None:
    """A chunk's own K/V and a decode's own token come from k, v: their cache slots hold NaN here."""
    p = Paged([0, 5, BS + 3], [BS + 2, 9, 20], 8, 2, 64, BS, torch.float16, seed=12)
    p.poison_new_slots()
    out, expected = run_prefill(p)
    close(out, expected, torch.float16)
    torch.testing.assert_close(out.double(), p.dense(), atol=4e-3, rtol=4e-3)
    pd = Paged([0, BS - 1, 3 * BS], [1, 1, 1], 8, 2, 64, BS, torch.float16, seed=13)
    pd.poison_new_slots()
    args = (pd.q, *pd.new_kv(), pd.k_cache, pd.v_cache, pd.block_tables, pd.seq_lens_t, pd.scale, 3 * BS + 1)
    for splits in (None, 1, 3):  # the own token in the first, the only, the last split
        out = tri.paged_decode_attention_triton(*args, num_splits=splits, block_n=16)
        torch.testing.assert_close(out.double(), pd.dense(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize(
    "block_size,block_m,block_n", [(32, 16, 16), (12, 64, 32), (8, 16, 64)], ids=["bs32", "bs12", "bs8"]
)
def test_prefill_tilings_and_block_sizes(block_size, block_m, block_n) -> None:
    """Tiles smaller and larger than a KV block, a non-power-of-two block size, G = 3."""
    p = Paged([0, 9, 40], [37, 30, 5], 6, 2, 32, block_size, torch.float16, seed=2)
    out, expected = run_prefill(p, block_m=block_m, block_n=block_n)
    close(out, expected, torch.float16)


def test_prefill_llama_shape_gpu_tiles() -> None:
    """Llama-3.1-8B heads (32/8, D 128, block 32) with the H100 tiles (BLOCK_M 128, BLOCK_N 64)."""
    p = Paged([0, 70], [45, 26], 32, 8, 128, 32, torch.bfloat16, seed=8)
    out, expected = run_prefill(p, block_m=128, block_n=64)
    close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("d", [80, 256])
def test_odd_and_large_head_dims(d) -> None:
    """head_dim padded to a power of two (80 -> 128) and the large-head configs (256)."""
    p = Paged([0, 17], [21, 12], 4, 2, d, BS, torch.float16, seed=9)
    out, expected = run_prefill(p)
    close(out, expected, torch.float16)
    pd = Paged([0, 17, 40], [1, 1, 1], 4, 2, d, BS, torch.float16, seed=10)
    args = (pd.q, *pd.new_kv(), pd.k_cache, pd.v_cache, pd.block_tables, pd.seq_lens_t, pd.scale, 41)
    out = tri.paged_decode_attention_triton(*args, num_splits=2)
    close(out, ref.paged_decode_attention_torch(*args), torch.float16)


def test_prefill_strided_q_and_empty_sequence() -> None:
    """q as a view into a fused qkv buffer; a sequence with no new tokens in the batch."""
    p = Paged([4, 10, 0], [6, 0, 19], 8, 2, 64, BS, torch.float16, seed=3)
    qkv = torch.randn(p.q.shape[0], 12, 64).to(torch.float16)
    q = qkv[:, :8]
    q.copy_(p.q)
    assert not q.is_contiguous()
    out, expected = run_prefill(p, q=q)
    close(out, expected, torch.float16)
