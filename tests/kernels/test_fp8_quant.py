"""The fused per-token FP8 activation quantization kernel against the torch reference: same bits."""

import pytest
import torch

from rtllm.kernels.quant_gemm import quantize_fp8_per_token
from rtllm.kernels.triton_fp8_quant import quantize_fp8_per_token_triton


@pytest.mark.parametrize("m, k", [(1, 64), (3, 100), (5, 4096), (2, 5000), (0, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bits_equal_reference(m, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)).to(dtype)  # wide range: subnormal codes too
    if m >= 3:
        x[1] = 0  # an all-zero row: scale 1
        x[2, : k // 2] *= 1e4  # a few large values dominate the row's scale
    q_ref, s_ref = quantize_fp8_per_token(x)
    for max_block in (16384, 1024):  # the row read once, and in blocks (twice)
        q, s = quantize_fp8_per_token_triton(x, max_block=max_block)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_strided_rows():
    x = torch.randn(4, 256, dtype=torch.bfloat16)[:, :200]  # a column slice: rows 256 apart
    q_ref, s_ref = quantize_fp8_per_token(x)
    q, s = quantize_fp8_per_token_triton(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
