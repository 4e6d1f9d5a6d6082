"""FP8 activation quantization fused into the producers of an FP8 linear layer's input (SiLU-and-mul,
RMSNorm with and without the residual add): the fused Triton kernels (interpreted) against the
producer's kernel followed by the quantization kernel, bit for bit; their dispatch (plugins honoured);
FP8Linear taking the pre-quantized value; and a tiny FP8 Llama computing the same logits and greedy
tokens with the fusion on as with it off (RTLLM_FP8_FUSED_QUANT=0)."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import activation, dispatch, norm
from rtllm.kernels import quant_gemm as qg
from rtllm.kernels import triton_fp8_quant as fq
from rtllm.kernels.triton_activation import silu_and_mul_triton
from rtllm.kernels.triton_norm import fused_add_rms_norm_triton, rms_norm_triton
from rtllm.layers.linear import Linear
from rtllm.layers.quant import fp8
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig
from rtllm.sampling_params import SamplingParams
from tests.tiny import engine_last_logits, make_checkpoint, make_engine, ramp_prompts, run_engine

BF16 = torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same(a: tuple, b: tuple) -> None:
    """(e4m3 codes, scales) equal bit for bit."""
    assert a[0].dtype == b[0].dtype == torch.float8_e4m3fn and a[0].shape == b[0].shape
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def _rows(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with a zero row (scale 1) and a large one (fp16 still finite after SiLU-and-mul)."""
    x = torch.randn(M, K, generator=_gen(seed)) * 2
    x[1] = 0
    x[-1] *= 20
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("inter", [300, 1024])
def test_silu_and_mul_fp8_equals_unfused(dtype, inter):
    x = _rows(4, 2 * inter, dtype, seed=inter)
    _same(fq.silu_and_mul_fp8_quant_triton(x), fq.quantize_fp8_per_token_triton(silu_and_mul_triton(x)))


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("H", [200, 576])
def test_rms_norm_fp8_equals_unfused(dtype, H):
    x, r = _rows(4, H, dtype, seed=H), torch.randn(4, H, generator=_gen(H + 1)).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=_gen(H + 2))).to(dtype)
    q, s, summed = fq.rms_norm_fp8_quant_triton(x, None, w, 1e-6)
    assert summed is None
    _same((q, s), fq.quantize_fp8_per_token_triton(rms_norm_triton(x, w, 1e-6)))
    q, s, summed = fq.rms_norm_fp8_quant_triton(x, r, w, 1e-6)
    y, want_sum = fused_add_rms_norm_triton(x, r, w, 1e-6)
    _same((q, s), fq.quantize_fp8_per_token_triton(y))
    assert torch.equal(summed, want_sum)


@pytest.fixture
def producers_on_triton(monkeypatch):
    """The norm and activation kernels dispatch to Triton (interpreted) as on CUDA; returns the fused
    launches made."""
    monkeypatch.setattr(norm, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    launches: list[str] = []
    for name in ("silu_and_mul_fp8_quant_triton", "rms_norm_fp8_quant_triton"):
        real = getattr(fq, name)
        monkeypatch.setattr(fq, name, lambda *a, _real=real, _name=name: launches.append(_name) or _real(*a))
    return launches


def test_dispatch_fuses_unless_a_plugin_replaces_the_producer(producers_on_triton):
    launches = producers_on_triton
    H = 64
    x, r = _rows(3, H, BF16, seed=1), torch.randn(3, H, generator=_gen(2)).to(BF16)
    w = (1 + 0.1 * torch.randn(H, generator=_gen(3))).to(BF16)
    gu = _rows(3, 2 * H, BF16, seed=4)
    q, s, summed = norm.rms_norm_fp8(x, r, w, 1e-6)
    _same((q, s), qg.quantize_fp8_per_token(norm.fused_add_rms_norm(x, r, w, 1e-6)[0]))
    _same(activation.silu_and_mul_fp8(gu), qg.quantize_fp8_per_token(activation.silu_and_mul(gu)))
    assert launches == ["rms_norm_fp8_quant_triton", "silu_and_mul_fp8_quant_triton"]
    launches.clear()
    seen = []
    dispatch.register_kernel("silu_and_mul", lambda t: seen.append("act") or activation.silu_and_mul_torch(t))
    dispatch.register_kernel("rms_norm", lambda t, w_, e: seen.append("norm") or norm.rms_norm_torch(t, w_, e))
    try:
        _same(activation.silu_and_mul_fp8(gu), qg.quantize_fp8_per_token(activation.silu_and_mul_torch(gu)))
        q, s, summed = norm.rms_norm_fp8(x, None, w, 1e-6)
        _same((q, s), qg.quantize_fp8_per_token(norm.rms_norm_torch(x, w, 1e-6)))
    finally:
        dispatch.unregister_kernel("silu_and_mul")
        dispatch.unregister_kernel("rms_norm")
    assert seen == ["act", "norm"] and launches == [] and summed is None


def test_fp8_linear_takes_a_prequantized_input():
    """FP8Linear(FP8Activation) == FP8Linear(x) bit for bit (CPU emulation of _scaled_mm), bias included;
    takes_fp8_activation: only an FP8Linear past the weight-only rows, without an AWQ input scale."""
    torch.manual_seed(0)
    dense = Linear(64, 48, bias=True)
    torch.nn.init.normal_(dense.bias)
    layer = fp8.FP8Linear.from_linear(dense.to(BF16))
    x = torch.randn(20, 64, generator=_gen(5)).to(BF16)
    y = layer(fp8.FP8Activation(*qg.quantize_fp8_per_token(x), BF16))
    assert y.dtype == BF16 and torch.equal(y, layer(x))
    assert fp8.takes_fp8_activation(layer, x) and not fp8.takes_fp8_activation(dense, x)
    assert not fp8.takes_fp8_activation(None, x)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms after the quantized qkv input
def test_tiny_fp8_llama_unchanged_by_fused_quantization(tmp_path, producers_on_triton, monkeypatch, arch):
    """Prefill logits bit for bit and greedy tokens, with the norms' and SiLU-and-mul's quantization fused
    (every FP8 linear quantizes its input on the CPU: the fused kernels run at every step) and not."""
    tiny = str(tmp_path)
    make_checkpoint(tiny, arch)
    loaded = load_model(tiny, "bfloat16", "cpu", max_positions=256, quant_config=QuantConfig("FP8"))
    prompts = ramp_prompts(2, seed=5, lo=17, hi=30)
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0)
    logits, tokens = {}, {}
    for fuse in (True, False):
        monkeypatch.setattr(fp8, "FUSE_INPUT_QUANT", fuse)
        producers_on_triton.clear()
        engine = make_engine(tiny, loaded=loaded, dtype="bfloat16", kv_tokens=512)
        logits[fuse] = engine_last_logits(engine, prompts[0])
        tokens[fuse] = run_engine(engine, prompts, params, arrivals=[0, 1])
        layers = loaded.config.num_hidden_layers
        # per layer and forward: two norms (qkv, gate_up) and SiLU-and-mul (down) when fused
        assert len(producers_on_triton) >= (3 * layers if fuse else 0) and (len(producers_on_triton) > 0) == fuse
    assert torch.equal(logits[True], logits[False])
    assert tokens[True] == tokens[False]
