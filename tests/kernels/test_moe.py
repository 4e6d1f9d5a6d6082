"""MoE kernels: Triton routing and grouped expert GEMMs (TRITON_INTERPRET=1 on CPU) == the torch
references, the references against plain formulas, and the expert alignment step's invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtllm.kernels.moe import fused_experts_torch, fused_topk_torch, moe_align_block_size
from rtllm.kernels.triton_moe import fused_experts_triton, fused_topk_triton

# the interpreter truncates bf16 where the GPU rounds; the experts' sums add a few bf16 ulps
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def router_logits(T: int, E: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(T, E, generator=gen(seed)) * 2).to(dtype)


def expert_weights(E: int, H: int, inter: int, dtype: torch.dtype, seed: int = 1):
    g = gen(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


def routing(T: int, E: int, k: int, seed: int = 2, experts: list[int] | None = None):
    """Random distinct expert ids per token (from ``experts`` when given) and positive weights."""
    g = gen(seed)
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k, generator=g) + 0.1
    return w / w.sum(-1, keepdim=True), ids


# --------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (60, 8), (128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_topk_triton_equals_reference(T, E, k, renormalize, dtype) -> None:
    logits = router_logits(T, E, dtype, seed=T + E)
    w, ids = fused_topk_triton(logits, k, renormalize)
    w_ref, ids_ref = fused_topk_torch(logits, k, renormalize)
    assert w.dtype == w_ref.dtype == torch.float32 and ids.dtype == ids_ref.dtype == torch.int32
    assert w.shape == ids.shape == (T, k)
    # bf16 logits can tie exactly: the same probabilities are chosen either way
    probs = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(probs.gather(1, ids.long()), probs.gather(1, ids_ref.long()), atol=0, rtol=0)
    if dtype == torch.float32:
        assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


def test_fused_topk_reference_against_formula() -> None:
    logits = router_logits(9, 8, torch.float32, seed=3).double()
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    for renorm in (False, True):
        w, ids = fused_topk_torch(logits, 2, renorm)
        for t in range(9):
            order = sorted(range(8), key=lambda e: -p[t, e].item())[:2]
            assert ids[t].tolist() == order
            want = p[t, order]
            if renorm:
                want = want / want.sum()
            torch.testing.assert_close(w[t].double(), want, atol=1e-6, rtol=0)


def test_fused_topk_strided_logits_and_no_tokens() -> None:
    full = router_logits(6, 16, torch.float32)
    logits = full[:, :8]  # rows strided by 16
    w, ids = fused_topk_triton(logits, 2, True)
    w_ref, ids_ref = fused_topk_torch(logits, 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    w, ids = fused_topk_triton(full[:0], 2, True)
    assert w.shape == ids.shape == (0, 2)


# --------------------------------------------------------------------------------------------
# alignment


@pytest.mark.parametrize("T,E,k,block_m", [(1, 8, 2, 16), (7, 4, 2, 4), (33, 8, 3, 16), (5, 128, 8, 16)])
def test_align_groups_pairs_by_expert(T, E, k, block_m) -> None:
    _, ids = routing(T, E, k, experts=[e for e in range(E) if e % 3 != 1])  # some experts get no tokens
    sorted_ids, block_expert = moe_align_block_size(ids, E, block_m)
    n = T * k
    flat = ids.reshape(-1).tolist()
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted_ids.numel() >= n + min(E, n) * (block_m - 1) > 0
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        blk = sorted_ids[b * block_m:(b + 1) * block_m].tolist()
        if e < 0:  # past the last expert's run: all padding
            assert blk == [n] * block_m
            continue
        real = [s for s in blk if s < n]
        assert real and all(flat[s] == e for s in real)
        assert blk == real + [n] * (block_m - len(real))  # padding only at a run's end
        seen += real
    assert sorted(seen) == list(range(n))  # every pair exactly once
    want = sorted(range(n), key=lambda s: (flat[s], s))  # by expert, stable within one
    assert seen == want
    ends = [e for e in block_expert.tolist() if e >= 0]
    assert ends == sorted(ends) and block_expert.tolist() == ends + [-1] * (block_expert.numel() - len(ends))


def test_align_drops_foreign_experts() -> None:
    ids = torch.tensor([[0, 5], [-1, 2], [3, 4]], dtype=torch.int32)  # experts 0..3 are this rank's
    sorted_ids, block_expert = moe_align_block_size(ids, 4, 2)
    real = sorted(s for s in sorted_ids.tolist() if s < ids.numel())
    assert real == [0, 3, 4]
    assert [e for e in block_expert.tolist() if e >= 0] == [0, 2, 3]


# --------------------------------------------------------------------------------------------
# experts


def dense_oracle(x, w13, w2, topk_w, topk_ids) -> torch.Tensor:
    """fp64, every token through every expert, weighted by a dense [T, E] routing matrix."""
    T, E = x.shape[0], w13.shape[0]
    inter = w13.shape[1] // 2
    dense = torch.zeros(T, E, dtype=torch.float64)
    dense.scatter_add_(1, topk_ids.long(), topk_w.double())
    gu = torch.einsum("th,eih->tei", x.double(), w13.double())
    h = F.silu(gu[..., :inter]) * gu[..., inter:]
    y = torch.einsum("tei,ehi->teh", h, w2.double())
    return (y * dense[..., None]).sum(1)


CASES = [  # T, E, k, H, I: ragged token counts, I and H off the block sizes, top-k 1 / 2 / 8
    (1, 8, 2, 64, 32),
    (3, 4, 1, 48, 40),
    (17, 8, 2, 64, 32),
    (40, 8, 8, 32, 24),
    (9, 16, 8, 64, 48),
]


@pytest.mark.parametrize("T,E,k,H,inter", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_experts_triton_equals_reference(T, E, k, H, inter, dtype) -> None:
    g = gen(T)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, w2 = expert_weights(E, H, inter, dtype)
    # experts 1 and E-1 receive no token when k leaves room
    pool = [e for e in range(E) if e not in (1, E - 1)] if k <= E - 2 else None
    topk_w, topk_ids = routing(T, E, k, seed=T + 7, experts=pool)
    out = fused_experts_triton(x, w13, w2, topk_w, topk_ids)
    ref = fused_experts_torch(x, w13, w2, topk_w, topk_ids)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (T, H)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:
        torch.testing.assert_close(ref.double(), dense_oracle(x, w13, w2, topk_w, topk_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4),
                                    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2)], ids=str)
def test_fused_experts_block_configs(config) -> None:
    """Other tile shapes (and the grouped program order) give the same result."""
    T, E, k, H, inter = 45, 8, 2, 64, 48
    x = torch.randn(T, H, generator=gen(5))
    w13, w2 = expert_weights(E, H, inter, torch.float32)
    topk_w, topk_ids = routing(T, E, k, seed=6, experts=[0, 2, 3, 5, 6])
    out = fused_experts_triton(x, w13, w2, topk_w, topk_ids, config=config)
    torch.testing.assert_close(out, fused_experts_torch(x, w13, w2, topk_w, topk_ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pair_blocks", [True, False])
@pytest.mark.parametrize("T,k", [(1, 1), (1, 8), (5, 2), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_experts_pair_blocks(pair_blocks, T, k, dtype) -> None:
    """The GEMMs with a row block per (token, slot) pair without the alignment step, and aligned;
    experts repeated too."""
    E, H, inter = 16, 48, 40
    x = torch.randn(T, H, generator=gen(10)).to(dtype)
    w13, w2 = expert_weights(E, H, inter, dtype)
    topk_w, topk_ids = routing(T, E, k, seed=11, experts=list(range(0, E, 2)))  # tokens share experts
    out = fused_experts_triton(x, w13, w2, topk_w, topk_ids, config=dict(GEMV=False, PAIR_BLOCKS=pair_blocks))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), fused_experts_torch(x, w13, w2, topk_w, topk_ids).float(), atol=atol,
                               rtol=rtol)


@pytest.mark.parametrize("pair_blocks", [True, False])
def test_fused_experts_foreign_ids_contribute_nothing(pair_blocks) -> None:
    """Ids outside [0, E) (experts on another rank) are skipped by both GEMM paths."""
    T, E, H, inter = 6, 4, 32, 16
    x = torch.randn(T, H, generator=gen(8))
    w13, w2 = expert_weights(E, H, inter, torch.float32)
    topk_w, topk_ids = routing(T, 2 * E, 2, seed=9)  # ids in [0, 8): half are foreign
    out = fused_experts_triton(x, w13, w2, topk_w, topk_ids, foreign_ids=True,
                               config=dict(GEMV=False, PAIR_BLOCKS=pair_blocks))
    ref = fused_experts_torch(x, w13, w2, topk_w, topk_ids)
    local = torch.where(topk_ids < E, topk_w, torch.zeros_like(topk_w))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ref.double(), dense_oracle(x, w13, w2, local, topk_ids.clamp(max=E - 1)),
                               atol=1e-5, rtol=1e-5)


def test_fused_experts_no_tokens() -> None:
    w13, w2 = expert_weights(4, 32, 16, torch.float32)
    x = torch.zeros(0, 32)
    ids = torch.zeros(0, 2, dtype=torch.int32)
    assert fused_experts_triton(x, w13, w2, torch.zeros(0, 2), ids).shape == (0, 32)
    assert fused_experts_torch(x, w13, w2, torch.zeros(0, 2), ids).shape == (0, 32)
