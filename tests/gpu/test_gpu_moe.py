"""The MoE decode chain on the GPU (skipped without CUDA), as FusedMoE runs it at batch decode: the fused
router (GEMM + top-k, one launch), then the expert GEMV launches (gate/up, down), all programmatic
dependent launches on Hopper. Qwen3-30B-A3B's shapes (128 experts, top 8, H 2048, I 768) and Mixtral's
router (8 experts, top 2, its GEMM split over programs). The down launch reads the router's ids and
weights before its PDL wait: were it free to start before the router ends, it would read another
input's routing. So many inputs run back to back without a sync, and in a replayed CUDA graph, each
against the experts' torch reference with the ids and weights the router gave it."""

import pytest
import torch

from rtllm.kernels import moe
from rtllm.kernels.triton_moe import fused_experts_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = dict(atol=1e-2, rtol=2**-6)  # bf16 GEMVs against cuBLAS: an ulp or two; a wrong expert is off by O(1)


def _weights(E, H, inter, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gate = (torch.randn(E, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) * inter**-0.5).bfloat16()
    return gate, w13, w2


def _layer(x, gate, w13, w2, k):
    weights, ids = moe.route(x, gate, k, True)
    return weights, ids, fused_experts_triton(x, w13, w2, weights, ids)


@pytest.mark.parametrize("T,E,H,inter,k", [(1, 128, 2048, 768, 8), (4, 128, 2048, 768, 8), (1, 8, 4096, 1024, 2)],
                         ids=str)
def test_decode_chain_back_to_back(T, E, H, inter, k):
    gate, w13, w2 = _weights(E, H, inter)
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(T, H, device="cuda", generator=g).bfloat16() for _ in range(24)]
    runs = [_layer(x, gate, w13, w2, k) for x in xs]  # back to back, no sync
    for x, (weights, ids, out) in zip(xs, runs, strict=True):
        torch.testing.assert_close(out, moe.fused_experts_torch(x, w13, w2, weights, ids), **TOL)


def test_decode_chain_graph_replay():
    """Captured once, replayed over new inputs copied into the static buffer: each replay routes anew."""
    E, H, inter, k = 128, 2048, 768, 8
    gate, w13, w2 = _weights(E, H, inter, seed=2)
    g = torch.Generator(device="cuda").manual_seed(3)
    static = torch.randn(1, H, device="cuda", generator=g).bfloat16()
    _layer(static, gate, w13, w2, k)  # compile, and create the router's counter, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids, out = _layer(static, gate, w13, w2, k)
    for _ in range(8):
        static.copy_(torch.randn(1, H, device="cuda", generator=g).bfloat16())
        graph.replay()
        torch.testing.assert_close(out, moe.fused_experts_torch(static, w13, w2, weights, ids), **TOL)
