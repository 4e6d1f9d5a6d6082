"""RoPE, the q/k norms and the cache write inside the decode split kernel (DecodeRope) against the two
launches they replace: rope_and_cache, then the decode kernel on its rotated q / k. Same bits in the
output and in both caches (the interpreter computes both paths with the same integer rounding)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import triton_attention as tri
from rtllm.kernels.triton_attention.decode_rope import DecodeRope
from rtllm.layers.rope import RotaryEmbedding
from tests.kernels.paged import Paged

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN slots compare equal)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def run_both(p: Paged, dtype: torch.dtype, rot: int, norm: bool, cache_dtype: torch.dtype, **kw):
    """(output, k cache, v cache) of the two launches and of the fused kernel, from the same raw q / k (on
    the device of p's tensors: tests/gpu moves them to CUDA)."""
    g = torch.Generator().manual_seed(3)
    q = p.q
    k, v = p.new_kv()
    k = (k.float() * 1.7 + 0.2).to(dtype)  # before RoPE (and the norm): anything
    dev = q.device
    cs = RotaryEmbedding(rot, 512, 10000.0).cos_sin_cache.to(dev)
    positions = p.seq_lens_t.long() - 1
    slots = torch.cat([p.slots(b, s - 1, s) for b, s in enumerate(p.seq_lens)])
    if 0 in p.seq_lens:  # padding rows (CUDA graphs): position 0, slot -1, seq_len 0
        pad = torch.tensor([s == 0 for s in p.seq_lens], device=dev)
        positions, slots = positions.clamp(min=0), torch.where(pad, -1, slots)
    qk_norm = None
    if norm:
        qn, kn = ((torch.rand(p.d, generator=g) + 0.5).to(dev, dtype) for _ in range(2))
        qk_norm = (qn, kn, 1e-6)
    scales = {"k_scale": 0.05, "v_scale": 0.04} if cache_dtype == FP8 else {}
    caches = []
    for _ in range(2):
        kc, vc = p.k_cache.clone(), p.v_cache.clone()
        if cache_dtype == FP8:
            kc, vc = (c.float().nan_to_num(0.0).mul(20).to(FP8) for c in (kc, vc))
        caches.append((kc, vc))
    (kc_a, vc_a), (kc_b, vc_b) = caches
    qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, kc_a, vc_a, slots, qk_norm=qk_norm, **scales)
    args = (p.block_tables, p.seq_lens_t, p.scale, max(p.seq_lens))
    out_a = tri.paged_decode_attention_triton(qr, kr, v, kc_a, vc_a, *args, **scales, **kw)
    out_b = tri.paged_decode_attention_triton(q, k, v, kc_b, vc_b, *args, **scales, **kw,
                                              rope=DecodeRope(positions, cs, slots, qk_norm))
    return (out_a, kc_a, vc_a), (out_b, kc_b, vc_b)


CASES = [  # dtype, rotary_dim, q/k norm, cache dtype, kernel overrides
    (torch.float32, 64, False, torch.float32, {}),
    (torch.bfloat16, 64, False, torch.bfloat16, {"num_splits": 4, "block_n": 16}),
    (torch.bfloat16, 32, True, torch.bfloat16, {"num_splits": 3, "block_n": 16, "merge": "last_split"}),
    (torch.bfloat16, 64, True, FP8, {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-rot{c[1]}-norm{int(c[2])}-{c[3]}-{len(c[4])}")
def test_decode_rope_in_the_kernel_gives_the_two_launches_bits(case) -> None:
    dtype, rot, norm, cache_dtype, kw = case
    p = Paged([0, 14, 40, 3], [1] * 4, 8, 2, 64, 16, dtype, seed=5)
    p.poison_new_slots()
    a, b = run_both(p, dtype, rot, norm, cache_dtype, **kw)
    assert not a[0].isnan().any()
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))


def test_decode_rope_padding_row_writes_nothing() -> None:
    """A CUDA-graph padding row (seq_len 0, slot -1) gets zeros and leaves the cache as it was."""
    p = Paged([9, 0, 20], [1, 0, 1], 4, 2, 32, 8, torch.bfloat16, seed=2)
    p.seq_lens = [10, 0, 21]
    p.seq_lens_t = torch.tensor(p.seq_lens, dtype=torch.int32)
    p.q = torch.randn(3, 4, 32, dtype=torch.bfloat16)
    p.q_lens = [1, 1, 1]
    p.k = [p.k[0], torch.zeros(1, 2, 32, dtype=torch.bfloat16), p.k[2]]
    p.v = [p.v[0], torch.zeros(1, 2, 32, dtype=torch.bfloat16), p.v[2]]
    before = p.k_cache.clone()
    a, b = run_both(p, torch.bfloat16, 32, False, torch.bfloat16)
    assert b[0][1].abs().max() == 0
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))
    changed = (bits(b[1]) != bits(before)).any(dim=(-1, -2)).flatten().nonzero().flatten().tolist()
    assert sorted(changed) == sorted(p.slots(b_, s - 1, s).item() for b_, s in ((0, 10), (2, 21)))


def test_decode_rope_rejects_a_bad_table() -> None:
    p = Paged([5], [1], 4, 2, 32, 8, torch.float32)
    k, v = p.new_kv()
    cs = RotaryEmbedding(32, 64, 10000.0).cos_sin_cache
    bad = DecodeRope(torch.tensor([5]), cs.t(), torch.tensor([3]))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        tri.paged_decode_attention_triton(p.q, k, v, p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, 6,
                                          rope=bad)
    with pytest.raises(ValueError, match="one entry a sequence"):
        tri.paged_decode_attention_triton(p.q, k, v, p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, 6,
                                          rope=DecodeRope(torch.tensor([5, 6]), cs, torch.tensor([3])))
