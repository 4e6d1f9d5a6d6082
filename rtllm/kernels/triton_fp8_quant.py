"""Per-token FP8 activation quantization in one Triton kernel.

``x [M, K]`` (16- or 32-bit) -> ``xq`` float8_e4m3fn ``[M, K]`` and ``scale`` fp32 ``[M, 1]``, the
same bits as the torch reference ``rtllm.kernels.quant_gemm.quantize_fp8_per_token``:
``scale = amax(|x_row|) * fp32(1 / 448)`` (1 for an all-zero row), ``xq = e4m3(clamp(x / scale))``
rounded to nearest even. One program per row reads the row once (held in registers; rows over 16K
elements: twice, the second read from the cache) and writes one byte per element: on an H100 the
torch reference's seven kernels took 24-460 us per linear of the Llama-3.1-8B shape at 64-2048 rows,
more than the FP8 GEMM after it (scripts/fp8_gemm_bench.py). The division x / scale is IEEE
round-to-nearest (``div_rn``), as torch's.

The same quantization fused into the kernels that produce an FP8 linear layer's input, so that the
16-bit activation is never written and read back: SiLU-and-mul (the down projection's input) and
RMSNorm with or without the residual add (the qkv / gate|up projections' input). They compute the
producer's value exactly as its own kernel does (the shared ``silu_mul`` / ``rms_norm_row``), round
it to the model dtype as that kernel's store would, and quantize that: the same bits as the two
kernels in turn. One program per row held in registers (rows up to 16K elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rtllm.kernels.triton_activation import silu_mul
from rtllm.kernels.triton_fp8 import e4m3_bits
from rtllm.kernels.triton_norm import norm_warps, norm_weight, rms_norm_row

INV_FP8_MAX = tl.constexpr(1.0 / 448.0)  # rounded to fp32 where it multiplies, as in the reference
MAX_FUSED_ROW = 16384  # the fused kernels hold a row in registers


@triton.jit
def _quantize_row(x):
    """(e4m3 codes, scale) of a whole row in registers, fp32 (masked lanes 0)."""
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax * INV_FP8_MAX, 1.0)
    return e4m3_bits(tl.math.div_rn(x, scale)), scale


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:  # the whole row in registers: read once
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        bits, scale = _quantize_row(x)
        tl.store(q_row + cols, bits, mask=mask)
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


# --------------------------------------------------------------------------------------------
# fused into the producers


def _quant_warps(block: int) -> int:
    return max(4, min(16, block // 1024))


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    bits, scale = _quantize_row(silu_mul(g, u, DT).to(DT).to(tl.float32))
    tl.store(q_ptr + row * stride_q + offs, bits, mask=mask)
    tl.store(s_ptr + row, scale)


def silu_and_mul_fp8_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] = [gate | up] -> (e4m3 [M, I], fp32 scales [M, 1]) of silu(gate) * up in x's dtype:
    bit-equal to quantize_fp8_per_token_triton(silu_and_mul_triton(x)). I <= MAX_FUSED_ROW."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, inter = x.shape[0], x.shape[1] // 2
    block = triton.next_power_of_2(inter)
    assert block <= MAX_FUSED_ROW, inter
    xq = torch.empty(m, inter, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _silu_and_mul_fp8_kernel[(m,)](x, xq.view(torch.uint8), scales, x.stride(0), xq.stride(0), inter,
                                       BLOCK=block, num_warps=_quant_warps(block))
    return xq, scales


@triton.jit
def _rms_norm_fp8_kernel(x_ptr, r_ptr, w_ptr, s_ptr, q_ptr, sc_ptr, stride_x, stride_r, stride_s, stride_q, eps,
                         H: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    w = norm_weight(w_ptr, H, BLOCK)
    y, offs, mask = rms_norm_row(x_ptr, r_ptr, w, s_ptr, row, stride_x, stride_r, stride_s, eps, H, BLOCK, ADD)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    bits, scale = _quantize_row(y.to(DT).to(tl.float32))
    tl.store(q_ptr + row * stride_q + offs, bits, mask=mask)
    tl.store(sc_ptr + row, scale)


def rms_norm_fp8_quant_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x [M, H] (of x + residual, also returned) quantized per token: (e4m3 [M, H], fp32
    scales [M, 1], x + residual or None); bit-equal to the norm kernel then quantize_fp8_per_token_triton.
    x, residual and weight of one dtype; H <= MAX_FUSED_ROW."""
    assert x.dim() == 2 and weight.shape == (x.shape[1],) and weight.dtype == x.dtype, (x.shape, weight.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    m, h = x.shape
    block = triton.next_power_of_2(h)
    assert block <= MAX_FUSED_ROW, h
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        r = residual if residual.stride(-1) == 1 else residual.contiguous()
        s = torch.empty_like(x)
    else:
        r = s = x  # unused
    xq = torch.empty(m, h, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _rms_norm_fp8_kernel[(m,)](x, r, w, s, xq.view(torch.uint8), scales, x.stride(0), r.stride(0), s.stride(0),
                                   xq.stride(0), eps, H=h, BLOCK=block, ADD=residual is not None,
                                   num_warps=norm_warps(block))
    return xq, scales, (s if residual is not None else None)
