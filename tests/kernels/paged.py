"""Shared by the paged-attention tests (test_attention_prefill / _decode / _cache): Triton kernels ==
torch references == a dense-attention oracle.

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

import torch

from rtllm.kernels import attention as ref

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
        pos = torch.arange(lo, hi, device=self.block_tables.device)
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


def rope_cache_case(dtype: torch.dtype, cache_dtype: torch.dtype, amplitude: float = 1.0):
    """Inputs of a fused RoPE + cache write: (positions, q, k, v, kc, vc, kc2, vc2, slots), with
    9 tokens of 8 query / 2 KV heads (head_dim 64, values ~ N(0, amplitude^2)) at random positions
    < 100, written to distinct random slots of two identical zeroed caches of 8 blocks of 4."""
    g = torch.Generator().manual_seed(7)
    T, Hq, Hkv, D, bs, nb = 9, 8, 2, 64, 4, 8
    qkv = (torch.randn(T, Hq + 2 * Hkv, D, generator=g) * amplitude).to(dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]
    positions = torch.randint(0, 100, (T,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    kc = torch.zeros(nb, bs, Hkv, D, dtype=cache_dtype)
    vc = torch.zeros(nb, bs, Hkv, D, dtype=cache_dtype)
    return positions, q, k, v, kc, vc, kc.clone(), vc.clone(), slots




REF_CASES = [
    # ctx_lens, q_lens, hq, hkv, d, block_size
    ([0, 0, 0, 0], [1, 15, 16, 17], 4, 4, 64, 16),
    ([0, 5, 16, 33], [40, 7, 16, 20], 8, 2, 64, 16),
    ([3, 0], [9, 50], 8, 1, 128, 32),
    ([20, 31], [12, 1], 6, 2, 32, 12),
    ([2, 17, 40], [3, 1, 9], 16, 8, 32, 8),  # more KV heads than the CPU decode's block-diagonal matmuls take
]


BS = 16
HEADS = [(4, 4, 64), (8, 2, 64), (8, 1, 128), (16, 2, 128)]  # GQA ratios 1, 4, 8, 8
