"""A MoE layer at decode in three launches (routed_experts_triton, TRITON_INTERPRET=1 on CPU): the router
GEMM leaves partial sums, and the two GEMV launches route each token themselves (k rounds of argmax over
its logits' exponentials, in every program). The oracle is the path it replaces: the fused router +
routing (router_topk_triton, which equals the unfused GEMM + fused_topk_triton bit for bit), then the
experts' torch reference with those ids and weights.

Router inputs with small integer values make every logit exact, so ties are frequent: the gate/up and
the down launch must pick the same expert for each slot as the router does (the lower expert id first),
else the outputs differ by whole experts, far outside the tolerance."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels.moe import fused_experts_torch, fused_moe, route_torch
from rtllm.kernels.triton_moe import ROUTED_MAX_EXPERTS, fused_experts_triton, routed_experts_triton
from rtllm.kernels.triton_moe_routing import router_split, router_topk_triton
from tests.kernels.test_moe import TOL, expert_weights
from tests.kernels.test_moe_router import integer_inputs


def layer(T, E, H, inter, dtype, seed=0, local=None):
    x, gate = integer_inputs(T, E, H, dtype, seed=seed)
    w13, w2 = expert_weights(local or E, H, inter, dtype, seed=seed + 1)
    return x, gate, w13, w2


def reference(x, gate, w13, w2, k, renorm, expert_start=0):
    weights, ids = router_topk_triton(x, gate, k, renorm)
    return fused_experts_torch(x, w13, w2, weights, ids - expert_start), weights, ids


QWEN3 = [(T, 128, 128, 32, 8, renorm, dtype) for T in (1, 2) for renorm in (True, False)
         for dtype in (torch.float32, torch.bfloat16)]
OTHERS = [(1, 8, 2048, 32, 2, True, torch.bfloat16), (1, 16, 64, 40, 4, False, torch.float32),
          (2, 32, 96, 24, 3, True, torch.float32), (1, 6, 64, 16, 1, False, torch.bfloat16)]


@pytest.mark.parametrize("T,E,H,inter,k,renorm,dtype", QWEN3 + OTHERS, ids=str)
def test_routed_equals_router_then_experts(T, E, H, inter, k, renorm, dtype) -> None:
    """Qwen3-MoE's routing (8 of 128) at 1 and 2 tokens, Mixtral's (top 2 of 8) with the router split over
    4 programs per expert, top-k off a power of two (the down launch's padded slots), top-1."""
    if E == 8:
        assert router_split(E, H) == 4
    x, gate, w13, w2 = layer(T, E, H, inter, dtype, seed=T + E + k)
    out = routed_experts_triton(x, gate, w13, w2, k, renorm)
    assert out is not None and out.dtype == dtype and out.shape == (T, H)
    ref, weights, ids = reference(x, gate, w13, w2, k, renorm)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    # the unrouted GEMV launches with the router's ids and weights: the same slots, weights within an ulp
    gemv = fused_experts_triton(x, w13, w2, weights, ids, config=dict(GEMV=True))
    torch.testing.assert_close(out.float(), gemv.float(), atol=1e-6 if dtype == torch.float32 else atol, rtol=1e-5)


def test_routed_ties_take_the_lower_expert() -> None:
    """All router rows equal: every logit ties, so the top 4 are experts 0..3, as router_topk_triton picks."""
    T, E, H, inter, k = 1, 16, 32, 16, 4
    x = torch.ones(T, H)
    gate = torch.ones(E, H)
    w13, w2 = expert_weights(E, H, inter, torch.float32, seed=4)
    weights, ids = router_topk_triton(x, gate, k, True)
    assert ids.tolist() == [[0, 1, 2, 3]]
    out = routed_experts_triton(x, gate, w13, w2, k, True)
    torch.testing.assert_close(out, fused_experts_torch(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [0, 16, 32])
def test_routed_expert_parallel_slice(start) -> None:
    """A rank holding experts [start, start + 32) of 64: only the slots routed there contribute (the rest
    are another rank's), against the reference fed the shifted ids with foreign ones skipped."""
    T, E, H, inter, k = 1, 64, 64, 24, 8
    x, gate, _, _ = layer(T, E, H, inter, torch.float32, seed=start)
    w13, w2 = expert_weights(32, H, inter, torch.float32, seed=9)
    out = routed_experts_triton(x, gate, w13, w2, k, True, expert_start=start)
    ref, _, ids = reference(x, gate, w13, w2, k, True, expert_start=start)
    local = ((ids >= start) & (ids < start + 32)).sum().item()
    assert 0 < local < k  # some slots here, some on other ranks
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_routed_declines_what_it_does_not_take() -> None:
    """More pairs than the GEMV launches take, a config without them, or a router of more than
    ROUTED_MAX_EXPERTS experts: None (the caller routes and runs fused_experts)."""
    x, gate, w13, w2 = layer(4, 16, 32, 16, torch.float32)
    assert routed_experts_triton(x, gate, w13, w2, 4, True) is None  # 16 pairs of 16 experts
    assert routed_experts_triton(x[:1], gate, w13, w2, 4, True, config=dict(GEMV=False)) is None
    assert routed_experts_triton(x[:0], gate, w13, w2, 4, True) is None
    big = torch.zeros(2 * ROUTED_MAX_EXPERTS, 32)
    assert routed_experts_triton(x[:1], big, w13, w2, 1, True) is None


def test_fused_moe_cpu_is_route_then_experts() -> None:
    """On CPU (no Triton), fused_moe routes with the torch reference and shifts the ids of a rank's slice."""
    x, gate, w13, w2 = layer(3, 16, 32, 16, torch.float32, seed=5)
    weights, ids = route_torch(x, gate, 4, True)
    assert torch.equal(fused_moe(x, gate, w13, w2, 4, True), fused_experts_torch(x, w13, w2, weights, ids))
    part = fused_moe(x, gate, w13[4:8], w2[4:8], 4, True, expert_start=4)
    assert torch.equal(part, fused_experts_torch(x, w13[4:8], w2[4:8], weights, ids - 4))
