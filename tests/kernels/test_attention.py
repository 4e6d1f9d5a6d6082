"""Paged attention: Triton kernels == torch references == a dense-attention oracle.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (see conftest.py). Every
scenario builds dense per-sequence K/V, scatters them into a paged cache whose block ids are
shuffled and whose unused slots and padding blocks hold NaN (so any read outside a sequence
shows), then compares:

- the torch references against a naive fp64 softmax(QK^T) with an explicit causal mask on the
  unpaged K/V (proving the references), and
- each Triton kernel against its torch reference.

The attention kernels take the step's own K/V fresh (``Paged.new_kv``) and read only the prefix
from the cache; a test poisons the new tokens' cache slots to show they are not read.
"""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import attention as ref
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.rope import apply_rope_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of a kernel vs the reference at each dtype; the interpreter truncates to bf16.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
NAN = float("nan")


class Paged:
    """A batch of sequences in a paged cache (and the dense K/V they came from)."""

    def __init__(
        self,
        ctx_lens: list[int],
        q_lens: list[int],
        hq: int,
        hkv: int,
        d: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hkv, self.d, self.block_size, self.dtype = hq, hkv, d, block_size, dtype
        self.q_lens = q_lens
        self.seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
        B = len(q_lens)
        nblocks = [-(-s // block_size) for s in self.seq_lens]
        total = sum(nblocks) + 3  # spare blocks stay NaN; the last is the table padding
        ids = torch.randperm(total - 1, generator=g)
        max_blocks = max(nblocks) + 2
        self.block_tables = torch.full((B, max_blocks), total - 1, dtype=torch.int32)
        start = 0
        for b, n in enumerate(nblocks):
            self.block_tables[b, :n] = ids[start : start + n]
            start += n
        self.k = [torch.randn(s, hkv, d, generator=g).to(dtype) for s in self.seq_lens]
        self.v = [torch.randn(s, hkv, d, generator=g).to(dtype) for s in self.seq_lens]
        self.k_cache = torch.full((total, block_size, hkv, d), NAN, dtype=dtype)
        self.v_cache = torch.full((total, block_size, hkv, d), NAN, dtype=dtype)
        slots = [self.slots(b, 0, s) for b, s in enumerate(self.seq_lens)]
        self.all_slots = torch.cat(slots)
        ref.reshape_and_cache_torch(
            torch.cat(self.k), torch.cat(self.v), self.k_cache, self.v_cache, self.all_slots
        )
        # queries of the new tokens only, flat
        self.q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
        self.query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32)
        self.scale = d**-0.5

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' K and V, flat [T, Hkv, D] like q (what rope_and_cache hands the kernels)."""
        k = torch.cat([k[s - n :] for k, s, n in zip(self.k, self.seq_lens, self.q_lens)])
        v = torch.cat([v[s - n :] for v, s, n in zip(self.v, self.seq_lens, self.q_lens)])
        return k, v

    def poison_new_slots(self) -> None:
        """NaN into the cache slots of the new tokens: a kernel that reads them there shows it."""
        for b, (s, n) in enumerate(zip(self.seq_lens, self.q_lens)):
            slots = self.slots(b, s - n, s)
            for c in (self.k_cache, self.v_cache):
                flat = c.view(-1, self.hkv, self.d)
                if c.dtype == torch.float8_e4m3fn:  # e4m3 NaN as bytes (no fp8 CPU fill)
                    flat.view(torch.uint8)[slots] = 0x7F
                else:
                    flat[slots] = NAN

    def slots(self, b: int, lo: int, hi: int) -> torch.Tensor:
        pos = torch.arange(lo, hi)
        blocks = self.block_tables[b, pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size

    def dense(self) -> torch.Tensor:
        """Oracle: per sequence, fp64 softmax(q k^T * scale) with an explicit causal mask."""
        outs = []
        G = self.hq // self.hkv
        for b, n in enumerate(self.q_lens):
            s0 = int(self.query_start_loc[b])
            L = self.seq_lens[b]
            q = self.q[s0 : s0 + n].double()  # [n, Hq, D]
            k = self.k[b].double().repeat_interleave(G, dim=1)  # [L, Hq, D]
            v = self.v[b].double().repeat_interleave(G, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            qpos = torch.arange(L - n, L)
            mask = torch.arange(L)[None, :] <= qpos[:, None]  # [n, L]
            scores = scores.masked_fill(~mask[None], float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(outs)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# -------------------------------------------------------------------------------------------
# the references against the dense oracle (torch only: cheap, so a wide matrix)

REF_CASES = [
    # ctx_lens, q_lens, hq, hkv, d, block_size
    ([0, 0, 0, 0], [1, 15, 16, 17], 4, 4, 64, 16),
    ([0, 5, 16, 33], [40, 7, 16, 20], 8, 2, 64, 16),
    ([3, 0], [9, 50], 8, 1, 128, 32),
    ([20, 31], [12, 1], 6, 2, 32, 12),
]


@pytest.mark.parametrize("case", REF_CASES)
def test_prefill_reference_matches_dense_oracle(case) -> None:
    p = Paged(*case, dtype=torch.float32)
    p.poison_new_slots()
    out = ref.paged_prefill_attention_torch(
        p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens_t, p.scale
    )
    torch.testing.assert_close(out.double(), p.dense(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", REF_CASES)
def test_decode_reference_matches_dense_oracle(case) -> None:
    ctx, _, hq, hkv, d, bs = case
    p = Paged(ctx, [1] * len(ctx), hq, hkv, d, bs, torch.float32)
    max_len = max(p.seq_lens) + 5  # > every length: rows gather NaN slots that must be masked
    p.poison_new_slots()
    out = ref.paged_decode_attention_torch(
        p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len
    )
    torch.testing.assert_close(out.double(), p.dense(), atol=1e-5, rtol=1e-5)


def test_decode_reference_padding_row_is_zero() -> None:
    p = Paged([4, 0], [1, 1], 4, 2, 16, 8, torch.float32)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    out = ref.paged_decode_attention_torch(p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, seq_lens, p.scale, 5)
    assert out[1].abs().max() == 0 and not out.isnan().any()


# -------------------------------------------------------------------------------------------
# prefill: Triton vs reference

BS = 16
HEADS = [(4, 4, 64), (8, 2, 64), (8, 1, 128), (16, 2, 128)]  # GQA ratios 1, 4, 8, 8


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


# -------------------------------------------------------------------------------------------
# decode: Triton vs reference

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


@pytest.mark.parametrize("num_splits,block_n", [(1, 32), (3, 16), (8, 16), (64, 16)])
def test_decode_split_counts(num_splits, block_n) -> None:
    """One split (direct write), several, and more splits than some sequences have tokens;
    max_seq_len larger than every length; a padding row (seq_len 0) gives zeros."""
    p = Paged([0, 20, 66, 99], [1] * 4, 8, 2, 64, BS, torch.float32, seed=4)
    seq_lens = p.seq_lens_t.clone()
    seq_lens[0] = 0
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, seq_lens, p.scale, 120)
    out = tri.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=block_n)
    expected = ref.paged_decode_attention_torch(*args)
    close(out, expected, torch.float32)
    assert out[0].abs().max() == 0


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


# -------------------------------------------------------------------------------------------
# cache writes


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


def cos_sin(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot, 2).float() / rot)
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat((f.cos(), f.sin()), -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rot", [64, 32])
def test_rope_and_cache(dtype, rot) -> None:
    g = torch.Generator().manual_seed(7)
    T, Hq, Hkv, D, bs, nb = 9, 8, 2, 64, 4, 8
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=g).to(dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]
    positions = torch.randint(0, 100, (T,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    cs = cos_sin(128, rot)
    kc = torch.zeros(nb, bs, Hkv, D, dtype=dtype)
    vc = torch.zeros(nb, bs, Hkv, D, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, kc, vc, slots)
    qe, ke = ref.rope_and_cache_torch(positions, q, k, v, cs, kc2, vc2, slots)
    close(qr, qe, dtype)
    close(kr, ke, dtype)
    close(kc, kc2, dtype)
    assert torch.equal(vc, vc2)
    assert torch.equal(q, qkv[:, :Hq])  # inputs untouched
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
