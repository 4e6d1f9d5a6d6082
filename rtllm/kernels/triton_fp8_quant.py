"""Per-token FP8 activation quantization in one Triton kernel.

``x [M, K]`` (16- or 32-bit) -> ``xq`` float8_e4m3fn ``[M, K]`` and ``scale`` fp32 ``[M, 1]``, the
same bits as the torch reference ``rtllm.kernels.quant_gemm.quantize_fp8_per_token``:
``scale = amax(|x_row|) * fp32(1 / 448)`` (1 for an all-zero row), ``xq = e4m3(clamp(x / scale))``
rounded to nearest even. One program per row reads the row once (held in registers; rows over 16K
elements: twice, the second read from the cache) and writes one byte per element: on an H100 the
torch reference's seven kernels took 24-460 us per linear of the Llama-3.1-8B shape at 64-2048 rows,
more than the FP8 GEMM after it (scripts/fp8_gemm_bench.py). The division x / scale is IEEE
round-to-nearest (``div_rn``), as torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_fp8 import e4m3_bits

INV_FP8_MAX = tl.constexpr(1.0 / 448.0)  # rounded to fp32 where it multiplies, as in the reference


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:  # the whole row in registers: read once
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, amax * INV_FP8_MAX, 1.0)
        tl.store(q_row + cols, e4m3_bits(tl.math.div_rn(x, scale)), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.where(amax > 0, amax * INV_FP8_MAX, 1.0)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, e4m3_bits(tl.math.div_rn(x, scale)), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_fp8_per_token_triton(x: torch.Tensor, max_block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq float8_e4m3fn [M, K], scales fp32 [M, 1]); bit-equal to the torch reference.
    Rows of up to ``max_block`` elements are read once (held in registers), longer ones twice."""
    assert x.dim() == 2, x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scales
    one_pass = triton.next_power_of_2(k) <= max_block
    block = triton.next_power_of_2(k) if one_pass else 4096
    warps = max(4, min(16, block // 1024))
    _per_token_quant_kernel[(m,)](x, xq.view(torch.uint8), scales, k, x.stride(0), xq.stride(0), BLOCK=block,
                                  ONE_PASS=one_pass, num_warps=warps)
    return xq, scales
