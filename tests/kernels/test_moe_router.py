"""Router GEMM + routing in one launch (router_topk_triton, TRITON_INTERPRET=1 on CPU) == the unfused path
it replaces at batch decode: the router GEMM with its logits in the model dtype, then fused_topk_triton.

Inputs with small integer values make every logit exact whatever the order of the GEMM's additions
(and exactly representable in bf16), so expert ids and weights must agree bit for bit, exact ties
included (many logits tie: both paths take the lower expert id first)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtllm.kernels import triton_moe_routing as routing
from rtllm.kernels.moe import fused_topk_torch, route_torch
from rtllm.kernels.triton_moe_routing import fused_topk_triton, router_split, router_topk_triton


def integer_inputs(T: int, E: int, H: int, dtype: torch.dtype, seed: int = 0):
    """x in {-1, 0, 1}; router rows with at most ~200 nonzeros in {-1, 1}: every logit an integer of
    magnitude <= 256, exact in fp32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (T, H), generator=g).to(dtype)
    keep = torch.rand(E, H, generator=g) < min(1.0, 200 / H)
    w = (torch.randint(-1, 2, (E, H), generator=g) * keep).to(dtype)
    return x, w


def unfused(x: torch.Tensor, w: torch.Tensor, k: int, renorm: bool):
    return fused_topk_triton(F.linear(x, w), k, renorm)


@pytest.mark.parametrize("T,E,H,k", [(1, 128, 256, 8), (4, 128, 256, 8), (5, 8, 4096, 2), (8, 60, 300, 4),
                                     (3, 4, 64, 1)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_router_topk_equals_unfused_bit_for_bit(T, E, H, k, renorm, dtype) -> None:
    x, w = integer_inputs(T, E, H, dtype, seed=T + E)
    weights, ids = router_topk_triton(x, w, k, renorm)
    w_ref, ids_ref = unfused(x, w, k, renorm)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (T, k)
    assert torch.equal(ids, ids_ref)
    assert torch.equal(weights, w_ref)
    # the routing itself against the torch reference (which may order exact ties differently)
    logits = F.linear(x, w).float()
    w_t, ids_t = fused_topk_torch(logits, k, renorm)
    torch.testing.assert_close(logits.gather(1, ids.long()), logits.gather(1, ids_t.long()), atol=0, rtol=0)
    torch.testing.assert_close(weights, w_t, atol=1e-6, rtol=1e-5)


def test_router_topk_weight_read_in_tiles() -> None:
    """8 bf16 rows of 1024 columns against 128 experts: one program per expert reads its router-weight
    row in two tiles of 512 (the first one requested before the PDL wait, the second in the loop)."""
    T, E, H = 8, 128, 1024
    assert router_split(E, H) == 1 and max(256, 4096 // T) < H
    test_router_topk_equals_unfused_bit_for_bit(T, E, H, 8, True, torch.bfloat16)


def test_router_topk_random_fp32() -> None:
    """Random fp32 inputs: the same experts, weights within fp32 rounding of the GEMM's sum order."""
    g = torch.Generator().manual_seed(3)
    for T, E, H, k in ((1, 128, 512, 8), (7, 8, 4096, 2)):
        x, w = torch.randn(T, H, generator=g), torch.randn(E, H, generator=g) / H**0.5
        weights, ids = router_topk_triton(x, w, k, True)
        w_ref, ids_ref = unfused(x, w, k, True)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(weights, w_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_router_topk_rounds_logits_to_the_model_dtype(dtype) -> None:
    """Expert 1's fp32 logit is 2^-12 above expert 0's; both round to 1.0 in the model dtype, so the
    unfused path sees a tie and takes expert 0 first, with equal weights."""
    x = torch.tensor([[1.0, 2.0**-12]], dtype=dtype)
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-4.0, 0.0]], dtype=dtype)
    weights, ids = router_topk_triton(x, w, 2, False)
    w_ref, ids_ref = unfused(x, w, 2, False)
    assert ids.tolist() == ids_ref.tolist() == [[0, 1]]
    assert torch.equal(weights, w_ref) and weights[0, 0] == weights[0, 1]


def test_router_topk_counter_left_at_zero_and_token_limit() -> None:
    """Every launch leaves the arrival counter at zero (the next launch, or graph replay, starts from
    it); more tokens than the fused limit, or none, are handled by the caller / trivially."""
    x, w = integer_inputs(2, 16, 64, torch.float32)
    for _ in range(2):
        weights, ids = router_topk_triton(x, w, 2, True)
        assert torch.equal(ids, unfused(x, w, 2, True)[1])
        assert routing._router_counter(torch.device("cpu")).item() == 0
    big = torch.zeros(routing.ROUTER_FUSED_MAX_TOKENS + 1, 64)
    assert router_topk_triton(big, w, 2, True) is None
    assert not routing.router_fusable(8, 128, 2048, 2) and routing.router_fusable(4, 128, 2048, 2)
    weights, ids = router_topk_triton(x[:0], w, 2, True)
    assert weights.shape == ids.shape == (0, 2)


def test_route_reference_is_gemm_then_topk() -> None:
    x, w = torch.randn(3, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    weights, ids = route_torch(x, w, 2, True)
    w_ref, ids_ref = fused_topk_torch(F.linear(x, w), 2, True)
    assert torch.equal(weights, w_ref) and torch.equal(ids, ids_ref)


@pytest.mark.parametrize("E,H,split", [(128, 2048, 1), (8, 4096, 8), (8, 1024, 2), (8, 512, 1), (64, 4096, 2)])
def test_router_split(E, H, split) -> None:
    assert routing.router_split(E, H) == split
