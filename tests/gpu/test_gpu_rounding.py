"""Compiled kernels round as torch does (skipped without CUDA; run by scripts/gpu_check.sh).

On the CPU the kernels run under Triton's interpreter, which never fuses a multiply and an add. A
compiled kernel may (Triton's ``enable_fp_fusion``): RoPE's ``round(x1 * cos) - round(x2 * sin)``
became one bf16 FMA that skips the product's rounding, and 13% of rotated q / k elements differed
from transformers' by an ulp. The kernels that reproduce torch's op-by-op rounding launch without
fusion; these tests hold them to transformers' and the references' bits on the GPU."""

import pytest
import torch

from rtllm.kernels.activation import silu_and_mul_torch
from rtllm.kernels.attention_rope import rope_and_cache_torch
from rtllm.kernels.rope import apply_rope_torch
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_attention import rope_and_cache_triton
from rtllm.kernels.triton_norm import fused_add_rms_norm_triton
from rtllm.kernels.triton_rope import apply_rope_triton
from tests.kernels.test_norm_act_rope import cos_sin, hf_rope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d,rot", [(9, 3, 64, 64), (32, 8, 128, 128), (8, 2, 128, 64)], ids=str)
def test_rope_is_transformers_bits(hq, hkv, d, rot, dtype):
    T = 2048
    q, k, v = randn(T, hq, d, dtype=dtype), randn(T, hkv, d, dtype=dtype, seed=1), randn(T, hkv, d, dtype=dtype, seed=2)
    positions = torch.randperm(4096, device="cuda")[:T]
    cs = cos_sin(4096, rot).cuda()
    qr, kr = apply_rope_triton(positions, q, k, cs)
    assert torch.equal(qr, hf_rope(q, positions, cs)) and torch.equal(kr, hf_rope(k, positions, cs))
    qe, ke = apply_rope_torch(positions, q, k, cs)
    assert torch.equal(qr, qe) and torch.equal(kr, ke)
    # fused with the cache write (16-token pages, every token to its own slot)
    caches = [torch.zeros(T // 16 + 1, 16, hkv, d, dtype=dtype, device="cuda") for _ in range(4)]
    slots = torch.randperm(T + 16, device="cuda")[:T]
    qc, kc = rope_and_cache_triton(positions, q, k, v, cs, caches[0], caches[1], slots)
    qt, kt = rope_and_cache_torch(positions, q, k, v, cs, caches[2], caches[3], slots)
    assert torch.equal(qc, qt) and torch.equal(kc, kt)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_and_residual_add_are_torch_bits(dtype):
    x = randn(512, 2 * 14336, dtype=dtype) * 4
    assert torch.equal(silu_and_mul_triton(x), silu_and_mul_torch(x))
    h, r, w = randn(512, 4096, dtype=dtype), randn(512, 4096, dtype=dtype, seed=1), randn(4096, dtype=dtype, seed=2)
    _, s = fused_add_rms_norm_triton(h, r, w, 1e-6)
    assert torch.equal(s, h + r)
