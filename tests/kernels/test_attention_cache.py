"""KV-cache writes (reshape_and_cache, the fused RoPE + cache write), and chunked prefill then decode
through them as the runtime drives it (helpers: tests/kernels/paged.py)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import attention as ref
from rtllm.kernels import attention_rope
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.rope import apply_rope_torch
from tests.kernels.paged import DTYPES, NAN, close, rope_cache_case
from tests.kernels.test_norm_act_rope import cos_sin


@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
    ids=str,
)
def test_reshape_and_cache(dtype, cache_dtype) -> None:
    g = torch.Generator().manual_seed(6)
    T, H, D, bs, nb = 11, 4, 64, 8, 6
    kv = torch.randn(T, 2 * H, D, generator=g).to(dtype)
    k, v = kv[:, :H], kv[:, H:]  # strided views, as from a fused projection
    slots = torch.randperm(nb * bs, generator=g)[:T]
    kc = torch.randn(nb, bs, H, D, generator=g).to(cache_dtype)
    vc = torch.randn(nb, bs, H, D, generator=g).to(cache_dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    tri.reshape_and_cache_triton(k, v, kc, vc, slots)
    ref.reshape_and_cache_torch(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    # a negative slot (padding token) writes nothing
    slots[3] = -1
    kc3, vc3 = kc.clone(), vc.clone()
    tri.reshape_and_cache_triton(k + 1, v + 1, kc3, vc3, slots)
    keep = slots >= 0
    ref.reshape_and_cache_torch(k[keep] + 1, v[keep] + 1, kc, vc, slots[keep])
    assert torch.equal(kc, kc3) and torch.equal(vc, vc3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rot", [64, 32])
def test_rope_and_cache(dtype, rot) -> None:
    positions, q, k, v, kc, vc, kc2, vc2, slots = rope_cache_case(dtype, dtype)
    cs = cos_sin(128, rot)
    q_in, k_in = q.clone(), k.clone()
    qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, kc, vc, slots)
    qe, ke = attention_rope.rope_and_cache_torch(positions, q, k, v, cs, kc2, vc2, slots)
    close(qr, qe, dtype)
    close(kr, ke, dtype)
    close(kc, kc2, dtype)
    assert torch.equal(vc, vc2)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # inputs untouched
    if dtype == torch.float32:  # the reference itself vs an explicit rotation matrix
        qd = q.double()
        c, s = cs[positions].double().chunk(2, -1)
        x1, x2 = qd[..., : rot // 2], qd[..., rot // 2 : rot]
        manual = torch.cat(
            (x1 * c[:, None] - x2 * s[:, None], x2 * c[:, None] + x1 * s[:, None], qd[..., rot:]), -1
        )
        torch.testing.assert_close(qe.double(), manual, atol=1e-5, rtol=1e-5)


def test_engine_like_steps_match_dense_oracle() -> None:
    """Chunked prefill then decode, as the runtime drives it, all in Triton: rope_and_cache
    writes each step's K/V, then prefill/decode attention reads them back. Every step's output
    equals dense causal attention over the rotated full sequences."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, bs, dtype = 8, 2, 64, 16, torch.float16
    prompt = [37, 20]
    steps = 3
    total = [n + steps for n in prompt]
    q_all = [torch.randn(n, hq, d, generator=g).to(dtype) for n in total]
    k_all = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in total]
    v_all = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in total]
    cs = cos_sin(64, d)
    nblocks = 12
    tables = torch.randperm(nblocks, generator=g).to(torch.int32).view(2, 6)
    k_cache = torch.full((nblocks, bs, hkv, d), NAN, dtype=dtype)
    v_cache = torch.full((nblocks, bs, hkv, d), NAN, dtype=dtype)

    def slot(b: int, p: int) -> int:
        return int(tables[b, p // bs]) * bs + p % bs

    def oracle(b: int, lo: int, hi: int) -> torch.Tensor:
        pos = torch.arange(hi)
        qr, kr = (t.double() for t in apply_rope_torch(pos, q_all[b][:hi].float(), k_all[b][:hi].float(), cs))
        G = hq // hkv
        k, v = kr.repeat_interleave(G, 1), v_all[b][:hi].double().repeat_interleave(G, 1)
        s = torch.einsum("qhd,khd->hqk", qr[lo:hi], k) * d**-0.5
        mask = torch.arange(hi)[None, :] <= torch.arange(lo, hi)[:, None]
        return torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)

    done = [0, 0]
    chunk = 16
    while done != prompt:  # chunked prefill, both sequences in each step
        spans = [(done[b], min(done[b] + chunk, prompt[b])) for b in range(2)]
        rows = [(b, p) for b in range(2) for p in range(*spans[b])]
        positions = torch.tensor([p for _, p in rows])
        q = torch.stack([q_all[b][p] for b, p in rows])
        k = torch.stack([k_all[b][p] for b, p in rows])
        v = torch.stack([v_all[b][p] for b, p in rows])
        slots = torch.tensor([slot(b, p) for b, p in rows])
        qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, k_cache, v_cache, slots)
        qlens = [hi - lo for lo, hi in spans]
        qsl = torch.tensor([0, qlens[0], qlens[0] + qlens[1]], dtype=torch.int32)
        sl = torch.tensor([hi for _, hi in spans], dtype=torch.int32)
        out = tri.paged_prefill_attention_triton(
            qr, kr, v, k_cache, v_cache, tables, qsl, sl, d**-0.5, max(qlens), 64
        )
        expected = torch.cat([oracle(b, lo, hi) for b, (lo, hi) in enumerate(spans)])
        torch.testing.assert_close(out.double(), expected, atol=4e-3, rtol=4e-3)
        done = [hi for _, hi in spans]
    for step in range(steps):  # decode
        pos = [n + step for n in prompt]
        positions = torch.tensor(pos)
        q = torch.stack([q_all[b][p] for b, p in enumerate(pos)])
        k = torch.stack([k_all[b][p] for b, p in enumerate(pos)])
        v = torch.stack([v_all[b][p] for b, p in enumerate(pos)])
        slots = torch.tensor([slot(b, p) for b, p in enumerate(pos)])
        qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, k_cache, v_cache, slots)
        sl = torch.tensor([p + 1 for p in pos], dtype=torch.int32)
        out = tri.paged_decode_attention_triton(qr, kr, v, k_cache, v_cache, tables, sl, d**-0.5, max(pos) + 1)
        expected = torch.cat([oracle(b, p, p + 1) for b, p in enumerate(pos)])
        torch.testing.assert_close(out.double(), expected, atol=4e-3, rtol=4e-3)
