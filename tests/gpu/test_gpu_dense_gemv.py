"""The compiled dense 16-bit decode GEMV (skipped without CUDA), at Llama-3.1-8B and Qwen3-30B-A3B shapes
with the tuned or default launch configurations: against the fp64 product (fp32 sums, one rounding), its
fused SiLU-and-mul equal to the GEMV then the activation kernel bit for bit, and CUDA-graph replays
that reuse the split-K workspace give the same bits as eager launches."""

import pytest
import torch

from rtllm.kernels import gemm
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_quant_gemv import w16_gemv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (5120, 2048), (2048, 4096), (1000, 200)]


def _case(M, N, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("N,K", SHAPES)
def test_w16_gemv_matches_exact(N, K, M, dtype):
    x, w = _case(M, N, K, dtype)
    y = w16_gemv(x, w)
    exact = x.double() @ w.double().t()
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11  # round to nearest: half an ulp
    tol = ulp * exact.abs() + 1e-5 * exact.abs().amax()
    assert ((y.double() - exact).abs() <= tol).all()
    if gemm.DENSE_GEMV_MAX_M >= M:
        assert torch.equal(gemm.linear(x, w), y)


@pytest.mark.parametrize("M", [1, 2])
def test_w16_gemv_silu_and_mul_and_graph_replay(M):
    x, w = _case(M, 28672, 4096, torch.bfloat16, seed=M)
    fused = w16_gemv(x, w, silu_and_mul=True)
    assert torch.equal(fused, silu_and_mul_triton(w16_gemv(x, w)))
    xs, ws = _case(M, 2048, 4096, torch.bfloat16, seed=M + 1)  # split K: the workspace and its counters
    eager = w16_gemv(xs, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_f = w16_gemv(x, w, silu_and_mul=True)
        out_s = w16_gemv(xs, ws)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_f, fused) and torch.equal(out_s, eager)
