"""INT4 group-wise weights (W4A16): quantize, the dequantize reference, and packing for torch's CPU kernel.

Format: for a weight ``w [N, K]`` (out x in) and a group of ``g`` consecutive input channels,
codes ``q [N, K]`` in 0..15, ``scales [K/g, N]`` and ``zeros [K/g, N]`` with

    w[n, k] ~= (q[n, k] - 8) * scales[k // g, n] + zeros[k // g, n]

This is exactly what ``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes with
``scales_and_zeros = stack([scales, zeros], -1)`` (verified in tests/quantization/test_int4.py).
The zero is the value of code 8, so it is small for centered groups.

Quantization is round-to-nearest, asymmetric, from each group's min and max: scale = (max-min)/15
and code 0 maps to the min. A GGUF Q4_1 block (w = d*q + m, 32 weights, code 0 at the min and
15 at the max by construction) requantized with g=32 gives back its codes exactly.
"""

from __future__ import annotations

import torch

CPU_PACK_N_MULTIPLE = 16  # torch's CPU int4 packer needs out_features divisible by 16
_BLOCK_N = 64  # rows per block of the CPU packed layout (see unpack_w4_cpu)


def quantize_w4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes fp32 [N, K/g, g] in 0..15, scales fp32 [N, K/g, 1], zeros fp32 [N, K/g, 1]),
    grouped as computed: the math of :func:`quantize_w4_asym`, for callers that dequantize right away.

    Computed in fp32. A constant group (max == min) gets scale 0, codes 0 and zero = the value."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={K}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    # amin and amax apart: 4.6x faster than torch.aminmax over groups of 32 on the CPU (one thread,
    # 3072 x 576), the same values; AWQ's searches call this ~9,000 times for a 135M model
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (hi - lo) / 15.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round((wg - lo).mul_(inv)).clamp_(0, 15)
    zero = lo + 8.0 * scale  # the value of code 8: (0 - 8) * scale + zero == lo
    return codes, scale, zero


def quantize_w4_asym(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes int32 [N, K] in 0..15, scales fp32 [K/g, N], zeros fp32 [K/g, N]).

    Computed in fp32 (:func:`quantize_w4_groups`). A constant group (max == min) gets scale 0, codes 0
    and zero = the value."""
    codes, scale, zero = quantize_w4_groups(w, group_size)
    return (codes.reshape(w.shape).to(torch.int32), scale.squeeze(-1).t().contiguous(),
            zero.squeeze(-1).t().contiguous())


def dequantize_w4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: codes [N, K], scales / zeros [K/g, N] -> w [N, K] (computed in fp32, then ``dtype``)."""
    N, K = codes.shape
    groups = scales.shape[0]
    g = K // groups
    q = codes.float().reshape(N, groups, g)
    w = (q - 8.0) * scales.float().t().unsqueeze(-1) + zeros.float().t().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def pack_w4_cpu(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack for ``aten._weight_int4pack_mm_for_cpu``: (packed uint8 [N, K/2], scales_and_zeros [K/g, N, 2]).

    ``dtype`` is the kernel's activation dtype; scales and zeros are stored in it (the kernel
    requires them to match the activations). N must be a multiple of 16, K a multiple of the group."""
    N, K = codes.shape
    if N % CPU_PACK_N_MULTIPLE:
        raise ValueError(f"out_features={N} must be a multiple of {CPU_PACK_N_MULTIPLE} for the CPU int4 kernel")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def unpack_w4_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor | None:
    """Codes uint8 [N, K] back from the CPU packed layout, or None where this helper does not know it.

    Observed layout (torch 2.13, x86): rows in blocks of 64; block b holds ``[K, 32]`` bytes whose
    low nibble is row ``64b + j`` and high nibble row ``64b + 32 + j``. Only N divisible by 64 is
    handled (tail blocks are laid out differently). The layout is the kernel's private business,
    so callers must check the result against the codes they packed before relying on it."""
    N, K = out_features, in_features
    if N % _BLOCK_N or packed.shape != (N, K // 2) or packed.dtype != torch.uint8:
        return None
    b = packed.view(N // _BLOCK_N, K, _BLOCK_N // 2)
    return torch.stack((b & 15, b >> 4), dim=1).permute(0, 1, 3, 2).reshape(N, K)


def dequantize_packed_cpu_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                            out: torch.Tensor, u8: torch.Tensor) -> torch.Tensor:
    """The transposed weight ``w^T [K, N]`` from the CPU packed layout, written into ``out``.

    The fast path for large batches (dequantize once, then one dense GEMM). Only valid when
    ``unpack_w4_cpu`` reproduces the codes for this tensor (the caller checks once at pack time).
    ``out``: [K, N] in the scales' dtype; ``u8``: uint8 scratch of K*N/2 elements. Producing w^T
    keeps each copy's inner run contiguous (32 bytes), which is ~3x faster than producing w."""
    K, N = out.shape
    groups = K // group_size
    b = packed.view(N // _BLOCK_N, K, _BLOCK_N // 2).transpose(0, 1)  # [K, N/64, 32]
    scratch = u8.view(K, N // _BLOCK_N, _BLOCK_N // 2)
    w4 = out.view(K, N // _BLOCK_N, 2, _BLOCK_N // 2)
    torch.bitwise_and(b, 15, out=scratch)
    w4[:, :, 0].copy_(scratch)
    torch.bitwise_right_shift(b, 4, out=scratch)
    w4[:, :, 1].copy_(scratch)
    s = scales_and_zeros[..., 0].contiguous()
    zp = scales_and_zeros[..., 1] - 8 * s  # (q - 8) * s + z == q * s + (z - 8 s): two passes instead of three
    out.view(groups, group_size, N).mul_(s.unsqueeze(1)).add_(zp.unsqueeze(1))
    return out


def pack_int4_k8(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> int32 [K/8, N] for the Triton kernels (rtllm.kernels.quant_gemm's W4
    layout): word (i, n) holds codes[n, 8i + j] in bits 4j..4j+3. K must be a multiple of 8."""
    N, K = codes.shape
    if K % 8:
        raise ValueError(f"in_features={K} must be a multiple of 8 to pack int4 codes")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    q = codes.to(torch.int32).t().reshape(K // 8, 8, N)
    return (q << shifts.view(1, 8, 1)).sum(1, dtype=torch.int32)
