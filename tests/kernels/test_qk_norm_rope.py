"""Qwen3's q/k RMSNorm fused into the RoPE + KV-cache write (rope_and_cache_triton with ``qk_norm``,
TRITON_INTERPRET=1 on CPU) == the unfused path it replaces, bit for bit: rms_norm_triton on q and on
k, then rope_and_cache_triton (same rounding points: the normed value rounded to the input dtype,
times the weight rounded to the normed dtype, then rotated). Also == the torch reference within the
kernels' usual tolerance."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import attention_rope
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.norm import rms_norm_torch
from rtllm.kernels.triton_norm import rms_norm_triton
from rtllm.kernels.triton_rope import rope_launch
from tests.kernels.paged import close
from tests.kernels.test_norm_act_rope import cos_sin

EPS = 1e-6
FP8 = torch.float8_e4m3fn


def inputs(T, Hq, Hkv, D, dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, Hq + 2 * Hkv, D, generator=g) * 3).to(dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]  # strided views, as from the qkv GEMM
    qw = (1 + 0.5 * torch.randn(D, generator=g)).to(w_dtype)
    kw = (1 + 0.5 * torch.randn(D, generator=g)).to(w_dtype)
    positions = torch.randint(0, 100, (T,), generator=g)
    return q, k, v, qw, kw, positions


def caches(nb, bs, Hkv, D, dtype):
    return torch.zeros(nb, bs, Hkv, D, dtype=dtype), torch.zeros(nb, bs, Hkv, D, dtype=dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("D,rot", [(64, 64), (64, 32), (80, 80)])
@pytest.mark.parametrize("fp8,per_program", [(False, None), (True, 2)],  # paired, not crossed (CI time)
                         ids=["cache-qheads-all", "fp8cache-qheads-2"])
def test_fused_qk_norm_equals_unfused_bit_for_bit(dtype, w_dtype, D, rot, fp8, per_program) -> None:
    """per_program 2: the 5 q heads of a token over 3 programs (the last one ragged)."""
    T, Hq, Hkv, bs, nb = 7, 5, 2, 4, 4
    q, k, v, qw, kw, positions = inputs(T, Hq, Hkv, D, dtype, w_dtype, seed=D + rot)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(1))[:T]
    slots[2] = -1  # a padding token: normed and rotated, not cached
    cs = cos_sin(128, rot)
    cache_dtype = FP8 if fp8 else dtype
    scales = (0.03, 0.07) if fp8 else (1.0, 1.0)
    kc, vc = caches(nb, bs, Hkv, D, cache_dtype)
    kc2, vc2 = caches(nb, bs, Hkv, D, cache_dtype)
    qr, kr = rope_launch(positions, q, k, cs, v, kc, vc, slots, *scales, qk_norm=(qw, kw, EPS),
                         q_heads_per_program=per_program)
    qn, kn = rms_norm_triton(q, qw, EPS), rms_norm_triton(k, kw, EPS)
    qe, ke = tri.rope_and_cache_triton(positions, qn, kn, v, cs, kc2, vc2, slots, *scales)
    assert qr.dtype == qe.dtype == torch.promote_types(dtype, w_dtype)
    assert same(qr, qe) and same(kr, ke) and same(kc, kc2) and same(vc, vc2)
    if not fp8:  # and the torch reference, within the Triton-vs-torch tolerance (the interpreter truncates bf16)
        kc3, vc3 = caches(nb, bs, Hkv, D, cache_dtype)
        keep = slots >= 0  # the torch path's caller drops padding tokens
        qn, kn = rms_norm_torch(q[keep], qw, EPS), rms_norm_torch(k[keep], kw, EPS)
        qt, kt = attention_rope.rope_and_cache_torch(positions[keep], qn, kn, v[keep], cs, kc3, vc3, slots[keep])
        close(qr[keep], qt, dtype)
        close(kr[keep], kt, dtype)
        close(kc, kc3, dtype)
        assert torch.equal(vc, vc3)


def test_torch_reference_is_norm_then_rope() -> None:
    """rope_and_cache_torch(qk_norm=...) (the CPU engine's path) == the torch RMSNorm of q and k, then RoPE."""
    T, Hq, Hkv, D, bs, nb = 5, 4, 2, 32, 4, 2
    q, k, v, qw, kw, positions = inputs(T, Hq, Hkv, D, torch.bfloat16, torch.bfloat16)
    slots = torch.arange(T)
    cs = cos_sin(128, D)
    kc, vc = caches(nb, bs, Hkv, D, torch.bfloat16)
    kc2, vc2 = caches(nb, bs, Hkv, D, torch.bfloat16)
    qr, kr = attention_rope.rope_and_cache_torch(positions, q, k, v, cs, kc, vc, slots, qk_norm=(qw, kw, EPS))
    qn, kn = rms_norm_torch(q, qw, EPS), rms_norm_torch(k, kw, EPS)
    qe, ke = attention_rope.rope_and_cache_torch(positions, qn, kn, v, cs, kc2, vc2, slots)
    assert torch.equal(qr, qe) and torch.equal(kr, ke) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_no_qk_norm_path_unchanged() -> None:
    """Without qk_norm the launch is the plain RoPE + cache write (the inputs pass through unnormed), with
    a token's q heads in one program or one head per program."""
    T, Hq, Hkv, D, bs, nb = 3, 4, 2, 32, 4, 2
    q, k, v, qw, kw, positions = inputs(T, Hq, Hkv, D, torch.float32, torch.float32)
    cs = cos_sin(128, D)
    slots = torch.arange(T)
    kc2, vc2 = caches(nb, bs, Hkv, D, torch.float32)
    qe, ke = attention_rope.rope_and_cache_torch(positions, q, k, v, cs, kc2, vc2, slots)
    for per_program in (None, 1):
        kc, vc = caches(nb, bs, Hkv, D, torch.float32)
        qr, kr = rope_launch(positions, q, k, cs, v, kc, vc, slots, q_heads_per_program=per_program)
        close(qr, qe, torch.float32)
        close(kr, ke, torch.float32)
        close(kc, kc2, torch.float32)
        assert torch.equal(vc, vc2)
    assert q.norm(dim=-1).mean() > 2 * D**0.5  # unnormed inputs (a normed head's norm is ~sqrt(D))
    close(qr.norm(dim=-1), q.norm(dim=-1), torch.float32)
