"""Quantized GEMM / dequantize kernels: Triton (interpreted on CPU) against the torch references,
and the references against plain fp64 math on the unpacked weights."""

import pytest
import torch

from rtllm.kernels import quant_gemm as qg
from rtllm.kernels.triton_nvfp4 import dequantize_nvfp4_triton
from rtllm.kernels.triton_quant_gemm import (
    dequantize_w4_triton,
    w4_gemv_triton,
    w4a16_gemm_triton,
    w8a16_gemm_triton,
)

BF16 = torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_16bit_store(got: torch.Tensor, exact32: torch.Tensor) -> None:
    """A 16-bit tensor a kernel stored from fp32 values: equal to them rounded, except that the
    interpreter rounds fp32 -> bf16 toward zero (numpy), so allow one ulp (2^-7 relative)."""
    if got.is_cuda:
        assert torch.equal(got, exact32.to(got.dtype))
    else:
        assert ((got.float() - exact32).abs() <= 2**-7 * exact32.abs()).all()


def _w4(K: int, N: int, g: int, seed: int = 0):
    gen = _gen(seed)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight = (codes.view(K // 8, 8, N) << shifts.view(1, 8, 1)).sum(1, dtype=torch.int32)
    scales = (torch.rand(K // g, N, generator=gen) * 0.02 + 1e-3).to(BF16)
    zeros = (torch.randn(K // g, N, generator=gen) * 0.01).to(BF16)
    return codes, qweight, scales, zeros


def test_unpack_int4_k8_and_reference_dequantize():
    K, N, g = 64, 24, 32
    codes, qweight, scales, zeros = _w4(K, N, g)
    assert torch.equal(qg.unpack_int4_k8(qweight), codes)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32)
    s = scales.float().repeat_interleave(g, 0)
    z = zeros.float().repeat_interleave(g, 0)
    torch.testing.assert_close(wt, (codes.float() - 8) * s + z, rtol=0, atol=0)


@pytest.mark.parametrize("g", [32, 64])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_w4a16_triton_matches_reference(g, M, split_k):
    K, N = 128, 96  # N not a multiple of BLOCK_N: masked tail
    _, qweight, scales, zeros = _w4(K, N, g, seed=g + M)
    x = torch.randn(M, K, generator=_gen(M)).to(BF16)
    y = w4a16_gemm_triton(x, qweight, scales, zeros, split_k=split_k)
    assert y.shape == (M, N) and y.dtype == BF16
    # the interpreter multiplies fp32 values (no bf16 rounding of W) and truncates fp32 -> bf16
    # on store: within one bf16 ulp (2^-7 relative) of the exact product
    ref32 = x.double() @ qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    assert ((y.double() - ref32).abs() <= 2**-7 * ref32.abs() + 1e-6).all()
    # the reference rounds W to bf16 first: the two agree within a few bf16 roundings of the row
    ref = qg.w4a16_gemm_reference(x, qweight, scales, zeros)
    assert (y.float() - ref.float()).abs().max().item() <= 2**-7 * ref32.abs().max().item()


def test_w4a16_triton_fp32_activations():
    K, N, g = 64, 48, 32
    _, qweight, scales, zeros = _w4(K, N, g, seed=3)
    x = torch.randn(3, K, generator=_gen(3))
    y = w4a16_gemm_triton(x, qweight, scales, zeros)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, qg.w4a16_gemm_reference(x, qweight, scales, zeros), rtol=1e-5, atol=1e-5)


def test_dequantize_w4_triton_matches_reference():
    K, N, g = 96, 40, 32
    _, qweight, scales, zeros = _w4(K, N, g, seed=5)
    exact = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32)
    assert torch.equal(dequantize_w4_triton(qweight, scales, zeros, torch.float32), exact)
    _assert_16bit_store(dequantize_w4_triton(qweight, scales, zeros, BF16), exact)


@pytest.mark.parametrize("M", [1, 7, 16, 17, 70])  # > 16: the M-major tensor-core path (tiles of 32 rows here)
@pytest.mark.parametrize("split_k", [1, 3])
def test_w8a16_triton_matches_reference(M, split_k):
    K, N = 160, 72
    gen = _gen(M)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen) * 0.01 + 1e-4
    x = torch.randn(M, K, generator=gen).to(BF16)
    y = w8a16_gemm_triton(x, q, s, split_k=split_k)
    ref = qg.w8a16_gemm_reference(x, q, s)
    exact = (x.double() @ q.double().t()) * s.double()
    scale = exact.abs().max().item()
    assert y.dtype == BF16 and y.shape == (M, N)
    assert ((y.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all()  # one bf16 ulp (see above)
    assert (ref.double() - exact).abs().max().item() <= 2**-8 * scale


def test_w8a16_cpu_paths_match_reference():
    K, N = 256, 64
    gen = _gen(9)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen) * 0.01 + 1e-4
    for M in (1, qg.SMALL_M, qg.SMALL_M + 1, 40):
        for dtype in (BF16, torch.float32):
            x = torch.randn(M, K, generator=gen).to(dtype)
            y = qg.w8a16_gemm(x, q, s)
            exact = (x.to(BF16).double() @ q.double().t()) * s.double()
            assert y.dtype == dtype
            assert (y.double() - exact).abs().max().item() <= 2**-7 * exact.abs().max().item()


# -- FP8 -------------------------------------------------------------------------------------

def test_fp8_to_float_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]
    for dtype in (torch.float32, BF16):
        assert torch.equal(qg.fp8_to_float(codes, dtype), codes.to(dtype))


def test_fp8_per_token_quantization():
    x = torch.randn(6, 64, generator=_gen(0)) * torch.tensor([1e-3, 1, 10, 100, 0, 5]).view(6, 1)
    xq, sx = qg.quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and sx.shape == (6, 1)
    assert sx[4].item() == 1.0 and (xq[4].float() == 0).all()
    deq = xq.float() * sx
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; each row's amax is exact
    for i in (0, 1, 2, 3, 5):
        assert xq[i].float().abs().max().item() == 448.0
        big = x[i].abs() > x[i].abs().max() * 2**-6
        assert ((deq[i] - x[i]).abs()[big] <= 2**-4 * x[i].abs()[big] + 1e-9).all()


def test_fp8_emulation_matches_scaled_mm_semantics():
    """The CPU emulation == x quantized per token, exact products, fp32 sums, both scales, one
    rounding to bf16 (what torch._scaled_mm computes on the GPU); torch's own CPU _scaled_mm, where
    present, agrees within its summation order."""
    K, N, M = 96, 48, 5
    gen = _gen(1)
    w = torch.randn(N, K, generator=gen) * 0.05
    sw = w.abs().amax(1) / 448
    wq = (w / sw[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(M, K, generator=gen).to(BF16)
    y = qg.fp8_gemm(x, wq, sw)
    xq, sx = qg.quantize_fp8_per_token(x)
    exact = ((xq.double() @ wq.double().t()) * sx.double() * sw.double())
    assert y.dtype == BF16
    torch.testing.assert_close(y.double(), exact.to(BF16).double(), rtol=2**-8, atol=0)
    try:
        ref = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=BF16)
    except (RuntimeError, NotImplementedError):
        return
    torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-6)


# -- NVFP4 -----------------------------------------------------------------------------------

def _nvfp4(N: int, K: int, seed: int = 0):
    gen = _gen(seed)
    packed = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    bs = (torch.rand(N, K // 16, generator=gen) * 400 + 0.01).to(torch.float8_e4m3fn)
    bs[0, 0] = 2**-9  # a subnormal e4m3 scale
    bs[0, 1] = 0.0
    gs = torch.tensor(3.5e-4)
    return packed, bs, gs


def test_nvfp4_reference_decodes_e2m1():
    packed, bs, gs = _nvfp4(4, 32)
    w = qg.dequantize_nvfp4_reference(packed, bs, gs, torch.float32)
    lo, hi = packed & 15, packed >> 4
    codes = torch.stack((lo, hi), -1).view(4, 32)
    f4 = codes.view(torch.uint8)
    mag = torch.tensor(qg.E2M1_VALUES)[(f4 & 7).long()]
    val = torch.where(f4 >= 8, -mag, mag)
    exp = val * bs.float().repeat_interleave(16, 1) * gs
    torch.testing.assert_close(w, exp, rtol=1e-6, atol=0)
    if hasattr(torch, "float4_e2m1fn_x2"):  # torch's own packed fp4 dtype: same nibble order
        ref = packed.view(torch.float4_e2m1fn_x2)
        assert ref.shape == (4, 16)


@pytest.mark.parametrize("shape", [(16, 64), (40, 96)])
def test_nvfp4_triton_matches_reference(shape):
    N, K = shape
    packed, bs, gs = _nvfp4(N, K, seed=N)
    exact = qg.dequantize_nvfp4_reference(packed, bs, gs, torch.float32)
    assert torch.equal(dequantize_nvfp4_triton(packed, bs, gs, torch.float32), exact)
    _assert_16bit_store(dequantize_nvfp4_triton(packed, bs, gs, BF16), exact)


@pytest.mark.parametrize("M", [1, 5, 40])
def test_fp8_weight_only_triton_decodes_every_code(M):
    """The weight-only FP8 kernel (small M, and the M-major path past 16 rows): e4m3 bytes decoded in
    the kernel (all 256 codes but NaN appear as weights) equal the exact decode, x unquantized; one
    rounding to bf16."""
    g = _gen(11)
    N, K = 48, 256
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's NaNs
    w = codes[torch.randint(0, len(codes), (N, K), generator=g)].view(torch.float8_e4m3fn)
    scales = torch.rand(N, generator=g) / 100 + 1e-3
    x = torch.randn(M, K, generator=g).to(BF16)
    exact = (x.float() @ qg.fp8_to_float(w).t()) * scales
    _assert_16bit_store(w8a16_gemm_triton(x, w, scales), exact)
    _assert_16bit_store(w8a16_gemm_triton(x, w, scales, split_k=2), exact)


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("split_k", [1, 3])
def test_w4_gemv_triton_matches_reference(g, split_k):
    """The batch-1 GEMV (CUDA cores, scale and zero applied per tile) against the exact product."""
    K, N = 256, 72  # N not a multiple of BLOCK_N: masked tail; split 3 leaves a short last split
    _, qweight, scales, zeros = _w4(K, N, g, seed=g + split_k)
    x = torch.randn(1, K, generator=_gen(g)).to(BF16)
    y = w4_gemv_triton(x, qweight, scales, zeros, split_k=split_k)
    assert y.shape == (1, N) and y.dtype == BF16
    ref32 = x.double() @ qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    assert ((y.double() - ref32).abs() <= 2**-7 * ref32.abs() + 1e-5).all()
