"""The residual add + RMSNorm, router GEMM and routing of a MoE layer in one launch (norm_route_triton,
TRITON_INTERPRET=1 on CPU) == the two launches it replaces at decode: fused_add_rms_norm_triton, then
router_topk_triton on its output. The norm's outputs bit for bit (the same arithmetic, rms_norm_row);
the same experts; the weights within fp32 rounding (the logits' sums run in another order)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import moe as moe_kernels
from rtllm.kernels.triton_moe_norm_route import NORM_ROUTE_MAX_HIDDEN, norm_route_triton
from rtllm.kernels.triton_moe_routing import ROUTER_FUSED_MAX_TOKENS, router_topk_triton
from rtllm.kernels.triton_norm import fused_add_rms_norm_triton


def inputs(T, E, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    residual = (torch.randn(T, H, generator=g) * 4).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    router = (torch.randn(E, H, generator=g) / H**0.5).to(dtype)
    return h, residual, norm_weight, router


@pytest.mark.parametrize("T,E,H,k", [(1, 128, 256, 8), (4, 128, 128, 8), (8, 8, 512, 2), (3, 60, 200, 4)], ids=str)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_route_equals_norm_then_router(T, E, H, k, renorm, dtype) -> None:
    """Qwen3-MoE's routing (8 of 128) at 1 and 4 tokens, Mixtral's (2 of 8) at the 8-token limit, a hidden
    size off a power of two (masked columns)."""
    h, residual, nw, router = inputs(T, E, H, dtype, seed=T + E)
    y, s, weights, ids = norm_route_triton(h, residual, nw, 1e-6, router, k, renorm)
    y_ref, s_ref = fused_add_rms_norm_triton(h, residual, nw, 1e-6)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    w_ref, ids_ref = router_topk_triton(y_ref, router, k, renorm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == weights.shape == (T, k)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, w_ref, atol=1e-3 if dtype == torch.bfloat16 else 1e-6, rtol=1e-3)


def test_norm_route_declines_what_it_does_not_take() -> None:
    """More tokens than a decode step's fused router takes, or a row too wide for registers: None."""
    h, residual, nw, router = inputs(ROUTER_FUSED_MAX_TOKENS + 1, 8, 64, torch.float32)
    assert norm_route_triton(h, residual, nw, 1e-6, router, 2, True) is None
    h, residual, nw, router = inputs(1, 4, NORM_ROUTE_MAX_HIDDEN * 2, torch.float32)
    assert norm_route_triton(h, residual, nw, 1e-6, router, 2, True) is None


def test_norm_route_dispatch_off_cuda() -> None:
    """The dispatcher takes the fused kernel on CUDA only: on CPU the layer runs the norm, then routes."""
    h, residual, nw, router = inputs(1, 8, 64, torch.float32)
    assert moe_kernels.norm_route(h, residual, nw, 1e-6, router, 2, True) is None
