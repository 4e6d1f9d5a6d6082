"""The decode GEMV for dense 16-bit weights (rtllm.kernels.triton_quant_gemv.w16_gemv), interpreted on
CPU, against the exact product (fp64); its SiLU-and-mul epilogue against the GEMV then the activation
kernel (bit for bit); and its dispatch from rtllm.kernels.gemm and the gated MLP (rtllm.layers.activation):
1..DENSE_GEMV_MAX_M rows of 16-bit x without bias run it, everything else F.linear, and a module with
forward hooks (a calibration observing it) is called as a module."""

import pytest
import torch
import torch.nn.functional as F

from rtllm.kernels import dispatch, gemm
from rtllm.kernels import triton_quant_gemv as gv
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_quant_gemv import GemvConfig, w16_gemv
from rtllm.layers.activation import SiluAndMul, gated_up
from rtllm.layers.linear import MergedLinear
from tests.kernels.test_quant_gemv import _check_gated


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(M: int, N: int, K: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) * 0.05).to(dtype)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """fp32 sums of exact products, one rounding to x's dtype (the interpreter truncates: 2^-7 relative
    in bf16, 2^-10 in fp16), plus the fp32 summation's error."""
    exact = x.double() @ w.double().t()
    assert y.dtype == x.dtype and y.shape == exact.shape
    ulp = 2**-7 if x.dtype == torch.bfloat16 else 2**-10
    tol = ulp * exact.abs() + 1e-6 * exact.abs().amax()
    assert ((y.double() - exact).abs() <= tol).all()


# (block_n, block_k, split, prefetch): one split; splits reduced in the kernel; several splits of a
# block_k that leaves a masked K tail
CONFIGS = [(16, 32, 1, True), (32, 64, 3, False), (16, 16, 4, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "n{}k{}s{}{}".format(*c[:3], "p" if c[3] else ""))
def test_w16_gemv_matches_exact(dtype, M, cfg):
    x, w = _case(M, 40, 200, dtype, seed=M)  # N, K not multiples of the blocks
    _check(w16_gemv(x, w, GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])), x, w)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["n16k32s1p", "n32k64s3"])
def test_w16_gemv_silu_and_mul_equals_unfused(M, cfg):
    inter = 20
    x, w = _case(M, 2 * inter, 200, torch.bfloat16, seed=7 + M)
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])
    y = w16_gemv(x, w, config, silu_and_mul=True)
    _check_gated(y, w16_gemv(x, w, config), x.double() @ w.double().t())


@pytest.fixture
def gemv_on_cpu(monkeypatch):
    """gemm dispatches to the Triton kernels (interpreted) as on CUDA; records each w16_gemv launch
    (its silu_and_mul flag)."""
    from rtllm.kernels import activation

    monkeypatch.setattr(gemm, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    launches = []
    real = gv.w16_gemv
    monkeypatch.setattr(gv, "w16_gemv", lambda *a, **kw: launches.append(kw.get("silu_and_mul", False))
                        or real(*a, **kw))
    return launches


def test_linear_dispatch(gemv_on_cpu):
    launches = gemv_on_cpu
    K, N = 96, 48
    for M in (1, 2, 3):
        x, w = _case(M, N, K, torch.bfloat16, seed=30 + M)
        launches.clear()
        y = gemm.linear(x, w)
        assert launches == ([False] if M <= gemm.DENSE_GEMV_MAX_M else [])
        _check(y, x, w)
    x, w = _case(1, N, K, torch.bfloat16, seed=40)
    launches.clear()
    b = torch.randn(N, generator=_gen(41)).to(torch.bfloat16)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))  # a bias: F.linear
    assert torch.equal(gemm.linear(x.float(), w.float()), F.linear(x.float(), w.float()))  # fp32: F.linear
    assert torch.equal(gemm.linear(x, w.t().contiguous().t()), F.linear(x, w))  # column-major weight
    assert launches == []


def test_gated_mlp_dispatch(gemv_on_cpu):
    """A dense gate|up projection at decode: one fused launch, equal to the GEMV then the activation;
    with a forward pre-hook on it (calibration), a module call that the hook sees; and a plugin's
    silu_and_mul keeps the unfused path (it must see gate|up)."""
    launches = gemv_on_cpu
    K, inter = 64, 24
    layer = MergedLinear(K, [inter, inter]).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(_case(1, 2 * inter, K, torch.bfloat16, seed=50)[1])
    act = SiluAndMul()
    x = torch.randn(1, K, generator=_gen(51)).to(torch.bfloat16)
    y = gated_up(layer, act, x)
    assert launches == [True]
    assert torch.equal(y, silu_and_mul_triton(w16_gemv(x, layer.weight)))
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    launches.clear()
    assert torch.equal(gated_up(layer, act, x), y)
    hook.remove()
    assert seen == [x.shape] and launches == [False]
    calls = []
    dispatch.register_kernel("silu_and_mul", lambda t: calls.append(t.shape) or silu_and_mul_triton(t))
    try:
        launches.clear()
        assert torch.equal(gated_up(layer, act, x), y)
        assert launches == [False] and calls == [(1, 2 * inter)]
    finally:
        dispatch.unregister_kernel("silu_and_mul")
