"""RMSNorm, SiLU-and-mul and RoPE: Triton kernels (TRITON_INTERPRET=1 on CPU) == torch references,
and the references against plain formulas and transformers' RoPE. The kernels round each
intermediate as torch's ops in that dtype do (bit for bit where no sum's order or exp differs)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels.activation import silu_and_mul_torch
from rtllm.kernels.norm import fused_add_rms_norm_torch, rms_norm_torch
from rtllm.kernels.rope import apply_rope_torch
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_norm import fused_add_rms_norm_triton, rms_norm_triton
from rtllm.kernels.triton_rope import apply_rope_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one ulp of the dtype: a row's sum of squares or exp differs from torch's in the last bit
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def rand(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Tolerance of ``dtype`` (the inputs' precision; default: the result's dtype)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 100), (3, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(shape, dtype) -> None:
    x = rand(*shape, dtype=dtype) * 3
    w = rand(shape[-1], dtype=dtype, seed=1)
    close(rms_norm_triton(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))
    # fp32 weight over a low-precision activation promotes like the reference
    w32 = w.float()
    close(rms_norm_triton(x, w32, 1e-5), rms_norm_torch(x, w32, 1e-5), dtype)
    if dtype == torch.float32:  # the reference against the formula
        xd = x.double()
        expected = w.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(rms_norm_torch(x, w, 1e-6).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(5, 64), (7, 100), (2, 2, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm(shape, dtype) -> None:
    x = rand(*shape, dtype=dtype)
    r = rand(*shape, dtype=dtype, seed=1)
    w = rand(shape[-1], dtype=dtype, seed=2)
    x0, r0 = x.clone(), r.clone()
    y, s = fused_add_rms_norm_triton(x, r, w, 1e-6)
    ye, se = fused_add_rms_norm_torch(x, r, w, 1e-6)
    assert torch.equal(s, se)  # the sum rounds once, as torch's add does
    close(y, ye)
    assert torch.equal(x, x0) and torch.equal(r, r0)


def test_rms_norm_strided_rows() -> None:
    base = rand(6, 160, dtype=torch.float16)
    x = base[:, 16:144]  # rows of a wider buffer
    w = rand(128, dtype=torch.float16, seed=3)
    close(rms_norm_triton(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))


@pytest.mark.parametrize("shape", [(5, 2 * 96), (3, 2 * 1500), (2, 1, 2 * 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(shape, dtype) -> None:
    x = rand(*shape, dtype=dtype) * 4
    close(silu_and_mul_triton(x), silu_and_mul_torch(x))
    if dtype == torch.float32:
        gate, up = x.double().chunk(2, -1)
        torch.testing.assert_close(
            silu_and_mul_torch(x).double(), gate / (1 + torch.exp(-gate)) * up, atol=1e-5, rtol=1e-5
        )


def cos_sin(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot, 2).float() / rot)
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat((f.cos(), f.sin()), -1)


def rotate_half_oracle(x: torch.Tensor, positions: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Hugging Face's formulation: x * cos + rotate_half(x) * sin on the rotary channels."""
    rot = cs.shape[-1]
    c, s = cs[positions].double().chunk(2, -1)
    cos = torch.cat((c, c), -1)[:, None]
    sin = torch.cat((s, s), -1)[:, None]
    xr = x[..., :rot].double()
    x1, x2 = xr.chunk(2, -1)
    out = xr * cos + torch.cat((-x2, x1), -1) * sin
    return torch.cat((out, x[..., rot:].double()), -1)


def hf_rope(x: torch.Tensor, positions: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """transformers.models.llama's apply_rotary_pos_emb on x [T, H, D] (rotary channels first), with
    cos and sin in x's dtype as its rotary embedding returns them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rot = cs.shape[-1]
    c, s = cs[positions].float().chunk(2, -1)
    cos, sin = torch.cat((c, c), -1).to(x.dtype), torch.cat((s, s), -1).to(x.dtype)
    xr = x[..., :rot].transpose(0, 1)[None]  # [1, H, T, rot]
    out, _ = apply_rotary_pos_emb(xr, xr, cos[None], sin[None])
    return torch.cat((out[0].transpose(0, 1), x[..., rot:]), -1)


@pytest.mark.parametrize(
    "hq,hkv,d,rot", [(4, 4, 64, 64), (8, 2, 128, 128), (8, 1, 128, 64), (6, 2, 80, 40)], ids=str
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope(hq, hkv, d, rot, dtype) -> None:
    T = 7
    q = rand(T, hq, d, dtype=dtype)
    k = rand(T, hkv, d, dtype=dtype, seed=1)
    positions = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(2))
    cs = cos_sin(300, rot)
    qr, kr = apply_rope_triton(positions, q, k, cs)
    qe, ke = apply_rope_torch(positions, q, k, cs)
    assert torch.equal(qr, qe) and torch.equal(kr, ke)  # no sums: the same roundings, the same bits
    # transformers' own function in this dtype (cos and sin rounded to it): bit for bit
    assert torch.equal(qe, hf_rope(q, positions, cs)) and torch.equal(ke, hf_rope(k, positions, cs))
    if dtype == torch.float32:
        torch.testing.assert_close(qe.double(), rotate_half_oracle(q, positions, cs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ke.double(), rotate_half_oracle(k, positions, cs), atol=1e-5, rtol=1e-5)


def test_apply_rope_strided_int32_positions_bf16_table() -> None:
    T, hq, hkv, d = 5, 8, 2, 64
    qkv = rand(T, hq + 2 * hkv, d, dtype=torch.float16)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hkv]
    positions = torch.tensor([0, 3, 99, 1, 50], dtype=torch.int32)
    cs = cos_sin(100, 64).to(torch.bfloat16)
    qr, kr = apply_rope_triton(positions, q, k, cs)
    qe, ke = apply_rope_torch(positions.long(), q, k, cs)
    assert torch.equal(qr, qe) and torch.equal(kr, ke)
