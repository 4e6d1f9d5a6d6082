"""Paged decode attention (split-K): reference vs the dense oracle, Triton vs the reference (helpers
and the method: tests/kernels/paged.py)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import attention as ref
from rtllm.kernels import device_buffers
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.triton_attention import decode_splits
from tests.kernels.paged import BS, DTYPES, HEADS, REF_CASES, Paged, close

METHODS = ["matmul", "sdpa"]  # the CPU reference's two ways of serving a padded batch (auto: by dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", REF_CASES)
def test_decode_reference_matches_dense_oracle(case, method) -> None:
    ctx, _, hq, hkv, d, bs = case
    p = Paged(ctx, [1] * len(ctx), hq, hkv, d, bs, torch.float32)
    max_len = max(p.seq_lens) + 5  # > every length: rows gather NaN slots that must be masked
    p.poison_new_slots()
    out = ref.paged_decode_attention_torch(
        p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len, method=method
    )
    torch.testing.assert_close(out.double(), p.dense(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_decode_reference_padding_row_is_zero(method) -> None:
    p = Paged([4, 0], [1, 1], 4, 2, 16, 8, torch.float32)
    p.poison_new_slots()
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    out = ref.paged_decode_attention_torch(p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, seq_lens, p.scale, 5,
                                           method=method)
    assert out[1].abs().max() == 0 and not out.isnan().any()


def test_decode_reference_methods_agree_in_bf16() -> None:
    p = Paged([30, 7, 18], [1, 1, 1], 8, 2, 32, 8, torch.bfloat16)
    p.poison_new_slots()
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max(p.seq_lens) + 3)
    a, b = (ref.paged_decode_attention_torch(*args, method=m) for m in METHODS)
    torch.testing.assert_close(a.double(), p.dense(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(b.double(), p.dense(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="method='fast'"):
        ref.paged_decode_attention_torch(*args, method="fast")



DECODE_LENS = [1, BS - 1, BS, BS + 1, 4 * BS + 3, 2]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(heads, dtype) -> None:
    """Heuristic splits (several here: a small grid), lengths around block boundaries."""
    p = Paged([n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS), *heads, BS, dtype)
    max_len = max(p.seq_lens)
    splits, _ = tri.decode_num_splits(len(DECODE_LENS), heads[1], max_len, 64)
    assert splits > 1
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len)
    out = tri.paged_decode_attention_triton(*args)
    expected = ref.paged_decode_attention_torch(*args)
    close(out, expected, dtype)


def test_decode_splits_follow_each_sequence_not_max_seq_len() -> None:
    """A CUDA graph is captured at the engine's max_seq_len, which sizes the split grid; a sequence's
    splits are sized from its own length (whole tiles, as few as cover it), so the same short sequences
    give the same fp32 bits in a grid of 8 splits sized for max_seq_len 1024 or 65536 (sized from
    max_seq_len, the splits held 128 and 8192 tokens), and equal the reference."""
    p = Paged([40, 150, 7], [1] * 3, 8, 2, 64, BS, torch.float32, seed=6)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale)
    outs = [tri.paged_decode_attention_triton(*args, max_len, num_splits=8, block_n=16) for max_len in (1024, 65536)]
    assert torch.equal(outs[0], outs[1])
    close(outs[0], ref.paged_decode_attention_torch(*args, max(p.seq_lens)), torch.float32)


@pytest.mark.parametrize("merge", ["last_split", "launch"])
@pytest.mark.parametrize("num_splits,block_n", [(1, 32), (3, 16), (8, 16), (64, 16)])
def test_decode_split_counts(num_splits, block_n, merge) -> None:
    """One split (direct write), several, and more splits than some sequences have tokens;
    max_seq_len larger than every length; a padding row (seq_len 0) gives zeros. The splits merged by the
    last split to finish (the arrival counters are left at zero for the next launch) or by a launch."""
    p = Paged([0, 20, 66, 99], [1] * 4, 8, 2, 64, BS, torch.float32, seed=4)
    seq_lens = p.seq_lens_t.clone()
    seq_lens[0] = 0
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, seq_lens, p.scale, 120)
    out = tri.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n, merge=merge)
    expected = ref.paged_decode_attention_torch(*args)
    close(out, expected, torch.float32)
    assert out[0].abs().max() == 0
    counters = decode_splits.merge_counters(out.device, 1)
    assert counters is not None and counters.count_nonzero() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_merge_in_last_split_matches_merge_launch(dtype) -> None:
    """G = 8 query heads a KV head (as Qwen3-30B-A3B; head_dim 64: 8 splits a chunk) and G = 3 (padded
    heads) with 19 splits (three chunks, the last one partial), and 35 splits, all holding tokens of a 1,090-token
    context (more than 32: the merge's 64-wide tile), twice in a row on the same counters: both merges equal
    the reference, and each other to fp32 rounding (they sum the splits in other orders); the counters end
    at zero."""
    cases = [((16, 2, 64), [300, 5, 129], 20), ((9, 3, 64), [70, 1, 33], 20)]
    if dtype == torch.float32:  # the merge's arithmetic is fp32 whatever the dtype: the long case once
        cases.append(((8, 2, 64), [1090, 40], 64))
    for heads, lens, splits in cases:
        p = Paged([n - 1 for n in lens], [1] * len(lens), *heads, BS, dtype, seed=11)
        args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max(lens))
        expected = ref.paged_decode_attention_torch(*args)
        launch = tri.paged_decode_attention_triton(*args, num_splits=splits, block_n=16, merge="launch")
        for _ in range(2):
            fused = tri.paged_decode_attention_triton(*args, num_splits=splits, block_n=16, merge="last_split")
            assert decode_splits.merge_counters(fused.device, 1).count_nonzero() == 0
            close(fused, expected, dtype)
            torch.testing.assert_close(fused.float(), launch.float(), atol=1e-5 if dtype == torch.float32 else 1e-2,
                                       rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_merge_falls_back_to_a_launch_without_counters(monkeypatch) -> None:
    """More (sequence, KV head) pairs than arrival counters: the merge launch serves them; a bad merge
    name, as an argument or in the environment, is refused with its name."""
    monkeypatch.setattr(decode_splits, "MERGE_COUNTERS", 2)
    monkeypatch.setattr(device_buffers, "_buffers", {})
    p = Paged([30, 40], [1, 1], 8, 2, 32, BS, torch.float32, seed=3)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, 41)
    assert decode_splits.merge_counters(p.q.device, 4) is None
    close(tri.paged_decode_attention_triton(*args, num_splits=3, block_n=16, merge="last_split"),
          ref.paged_decode_attention_torch(*args), torch.float32)
    with pytest.raises(ValueError, match="merge 'both'"):
        tri.paged_decode_attention_triton(*args, num_splits=3, merge="both")
    monkeypatch.setenv("RTLLM_DECODE_MERGE", "fused")
    with pytest.raises(ValueError, match="RTLLM_DECODE_MERGE"):
        tri.paged_decode_attention_triton(*args, num_splits=3)


def test_decode_merge_mode_defaults_to_the_launch_and_follows_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("RTLLM_DECODE_MERGE", raising=False)
    assert decode_splits.merge_mode(None) == "launch"
    monkeypatch.setenv("RTLLM_DECODE_MERGE", "last_split")
    assert decode_splits.merge_mode(None) == "last_split"
    assert decode_splits.merge_mode("launch") == "launch"


def test_decode_block_size_32_strided_q() -> None:
    p = Paged([0, 31, 32, 70], [1] * 4, 32, 8, 128, 32, torch.bfloat16, seed=5)
    qbuf = torch.randn(4, 48, 128).to(torch.bfloat16)
    q = qbuf[:, 8:40]
    q.copy_(p.q)
    args = (q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, 71)
    close(tri.paged_decode_attention_triton(*args), ref.paged_decode_attention_torch(*args), torch.bfloat16)


def test_decode_split_heuristic_fills_the_gpu() -> None:
    """Llama-3.1-8B shapes (8 KV heads) on 132 SMs: every SM busy, one wave, no empty split."""
    for batch in (1, 2, 3, 8, 16, 64, 256):
        for ctx in (1, 100, 512, 2048, 8192, 131072):
            splits, split_tokens = tri.decode_num_splits(batch, 8, ctx, 64, 132)
            assert split_tokens % 64 == 0 and splits * split_tokens >= ctx
            assert (splits - 1) * split_tokens < ctx  # no empty trailing split
            assert 1 <= splits <= tri.DECODE_MAX_SPLITS
            programs = batch * 8 * splits
            assert programs <= max(batch * 8, 264)
            if batch * 8 >= 132:
                assert splits == 1
            elif ctx >= 64 * 33:
                assert programs > 132, (batch, ctx, splits)
    assert tri.decode_num_splits(1, 8, 8192, 64, 132) == (32, 256)
    assert tri.decode_num_splits(8, 8, 8192, 64, 132) == (4, 2048)
    assert tri.decode_num_splits(64, 8, 8192, 64, 132) == (1, 8192)


@pytest.mark.parametrize(
    "heads,prefetch,dtype",  # each prefetch distance and dtype twice, each head layout once (not the product)
    [(HEADS[0], 1, torch.float32), (HEADS[1], 2, torch.bfloat16), (HEADS[2], 1, torch.bfloat16),
     (HEADS[3], 2, torch.float32)],
    ids=lambda v: f"hq{v[0]}-hkv{v[1]}-d{v[2]}" if isinstance(v, tuple) else str(v),
)
def test_decode_prefetch(heads, prefetch, dtype) -> None:
    """The register-prefetch loop on a 16-bit / fp32 cache: lengths around block and tile boundaries,
    one split and several (more splits than some sequences have tiles)."""
    lens = [1, 2, BS, BS + 1, 2 * BS - 1, 4 * BS + 3, 7 * BS + 5]
    p = Paged([n - 1 for n in lens], [1] * len(lens), *heads, BS, dtype, seed=8)
    max_len = max(p.seq_lens)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len)
    expected = ref.paged_decode_attention_torch(*args)
    for splits in (1, 4):
        out = tri.paged_decode_attention_triton(*args, num_splits=splits, block_n=16, prefetch=prefetch)
        close(out, expected, dtype)
