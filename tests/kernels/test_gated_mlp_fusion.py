"""SiLU-and-mul fused into the quantized gate|up projection's decode GEMV, seen from the model: a tiny
Llama quantized to W4A16 / W8A16 / FP8 (bf16 activations), its GEMMs dispatched to the Triton kernels
as on CUDA (interpreted here), computes the same MLP outputs bit for bit and the same greedy tokens
with the fusion on as with it off (RTLLM_GEMV_SILU=0), and really runs the fused launch at M <= 2."""

from __future__ import annotations

import pytest
import torch

from rtllm.kernels import activation, dispatch
from rtllm.kernels import quant_gemm as qg
from rtllm.kernels import triton_quant_gemv as gv
from rtllm.layers.activation import SiluAndMul, gated_up
from rtllm.layers.linear import MergedLinear
from rtllm.layers.parallel_linear import merged_column_linear
from rtllm.layers.quant import FP8Linear, W8A16Linear, int4
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.quantization.config import QuantConfig
from rtllm.sampling_params import SamplingParams
from tests.tiny import make_checkpoint, make_engine, ramp_prompts, run_engine

FORMATS = [QuantConfig("W4A16", 32), QuantConfig("W8A16"), QuantConfig("FP8")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    make_checkpoint(path, "llama")
    return path


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Kernels dispatch as on CUDA (Triton, interpreted); W4 layers take the Triton layout. Returns the
    list of GEMV launches made (True: with SiLU-and-mul in the epilogue)."""
    monkeypatch.setattr(qg, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    monkeypatch.setattr(int4, "w4_backend", lambda device: "triton")
    launches: list[bool] = []
    for name in ("w4_gemv", "w8_gemv"):
        real = getattr(gv, name)
        monkeypatch.setattr(gv, name, lambda *a, _real=real, **kw: launches.append(kw.get("silu_and_mul", False))
                            or _real(*a, **kw))
    return launches


def _load(path: str, qc: QuantConfig):
    loaded = load_model(path, "bfloat16", "cpu", max_positions=256, quant_config=qc)
    mlp = loaded.model.model.layers[0].mlp
    assert isinstance(mlp.gate_up_proj, QuantizedLinear) and type(mlp.act) is SiluAndMul
    return loaded, mlp


@pytest.mark.parametrize("qc", FORMATS, ids=lambda q: q.quant_algo)
def test_quantized_mlp_fused_equals_unfused(tiny, triton_on_cpu, monkeypatch, qc):
    """The MLP of a loaded quantized model at M = 1, 2 (fused) and 3 (tensor-core GEMM + activation):
    bit-equal to the projection then the activation; a plugin's silu_and_mul sees gate|up."""
    _, mlp = _load(tiny, qc)
    for M in (1, 2, 3):
        x = torch.randn(M, mlp.gate_up_proj.in_features, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
        triton_on_cpu.clear()
        fused = gated_up(mlp.gate_up_proj, mlp.act, x)
        assert triton_on_cpu == ([True] if M <= 2 else [])
        unfused = mlp.act(mlp.gate_up_proj(x))
        assert fused.shape == (M, mlp.gate_up_proj.out_features // 2) and torch.equal(fused, unfused)
        assert torch.equal(mlp(x), mlp.down_proj(fused))
    seen = []
    dispatch.register_kernel("silu_and_mul", lambda t: seen.append(tuple(t.shape)) or activation.silu_and_mul_torch(t))
    try:
        y = gated_up(mlp.gate_up_proj, mlp.act, x[:1])
    finally:
        dispatch.unregister_kernel("silu_and_mul")
    assert seen == [(1, mlp.gate_up_proj.out_features)]
    assert torch.equal(y, activation.silu_and_mul_torch(mlp.gate_up_proj(x[:1])))


def test_dense_and_biased_projections_run_unfused():
    """A dense gate|up runs the activation after it; a quantized one with a bias too (the bias comes first)."""
    torch.manual_seed(0)
    dense = MergedLinear(32, [48, 48], bias=True)
    torch.nn.init.normal_(dense.weight)
    torch.nn.init.normal_(dense.bias)
    x = torch.randn(2, 32)
    assert torch.equal(gated_up(dense, SiluAndMul(), x), activation.silu_and_mul(dense(x)))
    layer = W8A16Linear.from_linear(dense)  # any format: the bias path is the base class's
    assert torch.equal(gated_up(layer, SiluAndMul(), x), activation.silu_and_mul(layer(x)))


@pytest.mark.parametrize("fmt", ["w4", "int8", "fp8"])
def test_tensor_parallel_rank_fuses_its_own_columns(triton_on_cpu, fmt):
    """A tensor-parallel rank's gate|up holds [gate_r | up_r] (parallel_linear.merged_column_linear): its
    fused output is its slice of the whole projection's silu(gate) * up, bit for bit."""
    K, inter, tp = 64, 48, 2
    gen = torch.Generator().manual_seed(7)
    gate, up = torch.randn(inter, K, generator=gen), torch.randn(inter, K, generator=gen)
    x = torch.randn(1, K, generator=gen).to(torch.bfloat16)

    def quantized(layer):
        with torch.no_grad():
            layer.weight_loader(layer.weight, gate, 0)
            layer.weight_loader(layer.weight, up, 1)
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
        if fmt == "w4":
            return int4.W4A16Linear.from_linear(layer, 32)
        return (W8A16Linear if fmt == "int8" else FP8Linear).from_linear(layer)

    whole = gated_up(quantized(merged_column_linear(K, [inter, inter], False, None)), SiluAndMul(), x)
    per = inter // tp
    for r in range(tp):
        mapping = Mapping(world_size=tp, tp_size=tp, rank=r)
        part = gated_up(quantized(merged_column_linear(K, [inter, inter], False, mapping)), SiluAndMul(), x)
        assert torch.equal(part, whole[:, r * per:(r + 1) * per])
    assert all(triton_on_cpu)


def test_tiny_llama_greedy_tokens_unchanged_by_fusion(tiny, triton_on_cpu, monkeypatch):
    """Two requests, the second arriving later: decode steps of one and of two rows (both fused). Only the
    decode rows run Triton (prefill takes the references, the same with the fusion on and off: faster).
    One format (FP8: the W8 GEMV): this checks the engine's wiring (LlamaMLP -> gated_up at 1 and 2 rows);
    each format's fused MLP is checked bit-equal to the unfused one above (each engine run here takes
    ~10 s of interpreted kernels)."""
    qc = QuantConfig("FP8")
    monkeypatch.setattr(qg, "triton_enabled", lambda t: t.shape[0] <= qg.W8_GEMV_MAX_M)
    loaded, _ = _load(tiny, qc)
    prompts = ramp_prompts(2, seed=3, lo=5, hi=12)
    # 4 tokens each, the second request from step 2: decode steps of one row (1, 4, 5) and two (3)
    params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0)
    tokens = {}
    for fuse in (True, False):
        monkeypatch.setattr(qg, "GEMV_SILU", fuse)
        triton_on_cpu.clear()
        tokens[fuse] = run_engine(make_engine(tiny, loaded=loaded, dtype="bfloat16", kv_tokens=512), prompts,
                                  params, arrivals=[0, 2])
        assert any(triton_on_cpu) == fuse
    assert all(len(t) == 4 for t in tokens[True])
    assert tokens[True] == tokens[False]
