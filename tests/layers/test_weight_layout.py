"""What the dense GEMMs read on a CPU: a oneDNN-packed copy of each Linear / LM-head weight
(rtllm.kernels.gemm.pack_for_cpu), or with packing off the memory layout of
rtllm.kernels.gemm.fast_weight_layout (column-major fp32 weights where this CPU's fp32 GEMM reads them
faster). Values, shapes and results stay F.linear's and transformers' (the oracles)."""

import pytest
import torch
import torch.nn.functional as F

from rtllm.kernels import gemm
from rtllm.layers.linear import Linear
from rtllm.sampling_params import SamplingParams
from tests.tiny import engine_last_logits, hf_greedy, make_checkpoint, make_engine, ramp_prompts, run_engine


@pytest.fixture
def layout(monkeypatch, request):
    """RTLLM_CPU_WEIGHT_LAYOUT set for the test (the choice is cached per process: cleared around it)."""
    monkeypatch.setenv("RTLLM_CPU_WEIGHT_LAYOUT", request.param)
    gemm.cpu_fp32_prefers_column_major.cache_clear()
    yield request.param
    gemm.cpu_fp32_prefers_column_major.cache_clear()


@pytest.mark.parametrize("layout", ["column"], indirect=True)
def test_column_major_weight_same_values_same_products(layout):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 40, generator=g), torch.randn(16, 40, generator=g)
    laid = gemm.fast_weight_layout(w)
    assert laid.shape == w.shape and laid.stride() == (1, 96) and torch.equal(laid, w)
    torch.testing.assert_close(gemm.linear(x, laid), x.double().matmul(w.double().t()).float(), atol=1e-5, rtol=1e-5)
    assert gemm.fast_weight_layout(laid) is laid  # laid out once
    bf = w.bfloat16()
    assert gemm.fast_weight_layout(bf) is bf  # only fp32 changes layout


@pytest.mark.parametrize("layout", ["row"], indirect=True)
def test_row_layout_keeps_the_tensor(layout):
    w = torch.randn(8, 4)
    assert gemm.fast_weight_layout(w) is w


def test_bad_layout_setting_is_named(monkeypatch):
    monkeypatch.setenv("RTLLM_CPU_WEIGHT_LAYOUT", "diagonal")
    gemm.cpu_fp32_prefers_column_major.cache_clear()
    try:
        with pytest.raises(ValueError, match="RTLLM_CPU_WEIGHT_LAYOUT='diagonal'"):
            gemm.fast_weight_layout(torch.randn(4, 4))
    finally:
        gemm.cpu_fp32_prefers_column_major.cache_clear()


def test_auto_measures_and_decides():
    gemm.cpu_fp32_prefers_column_major.cache_clear()
    assert isinstance(gemm.cpu_fp32_prefers_column_major(), bool)
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    torch.testing.assert_close(F.linear(x, gemm.fast_weight_layout(w)), F.linear(x, w))


def _matches_transformers(engine, hf, seed: int) -> None:
    """fp32 greedy tokens equal to transformers' generate (3 prompts, 24 tokens), last logits within 1e-4."""
    prompts = ramp_prompts(3, seed=seed, lo=3, hi=60)
    greedy = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    for p, o in zip(prompts, run_engine(engine, prompts, greedy)):
        assert o == hf_greedy(hf, p, 24)
    ref = hf(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(engine_last_logits(engine, prompts[0]), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["row", "column"], indirect=True)
def test_engine_with_each_layout_matches_transformers(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("RTLLM_CPU_PACKED_WEIGHTS", "0")  # the layouts serve where weights are not packed
    hf = make_checkpoint(str(tmp_path), "llama", tie_word_embeddings=True)
    engine = make_engine(str(tmp_path))
    model = engine.loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, laid out once
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    want_col = layout == "column"
    for w in [m.weight for m in linears] + [model.lm_head.weight]:
        assert (w.stride(0) == 1 and w.stride(1) == w.shape[0]) == want_col
    _matches_transformers(engine, hf, seed=11)


# -- oneDNN-packed CPU weights (rtllm.kernels.gemm.pack_for_cpu) --------------------------------------


@pytest.fixture
def packing(monkeypatch, request):
    monkeypatch.setenv("RTLLM_CPU_PACKED_WEIGHTS", request.param)
    return request.param


def _packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs weights of ``dtype`` (fp16 needs AVX-512 FP16 or AVX-NE-CONVERT)."""
    return gemm.pack_for_cpu(torch.zeros(2, 2, dtype=dtype)) is not None


def _with_packed(w: torch.Tensor) -> torch.nn.Parameter:
    if not _packs(w.dtype):
        pytest.skip(f"this CPU's oneDNN packs no {w.dtype} weights")
    param = torch.nn.Parameter(w, requires_grad=False)
    param.cpu_packed = gemm.pack_for_cpu(w)
    assert param.cpu_packed.is_mkldnn and param.cpu_packed.shape == w.shape
    return param


@pytest.mark.parametrize("packing", ["1"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_16bit_weight_gives_f_linear_bits(packing, dtype):
    """16-bit: the same oneDNN kernel as F.linear without its per-call reorder, so the same bits (the
    oracle), for 1, 16 and 3-D rows, with and without a bias."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    param = _with_packed(w)
    for shape in ((1, 40), (16, 40), (2, 5, 40)):
        x = torch.randn(*shape, generator=g).to(dtype)
        assert torch.equal(gemm.linear(x, param), F.linear(x, w))
        assert torch.equal(gemm.linear(x, param, b), F.linear(x, w, b))


@pytest.mark.parametrize("packing", ["1"], indirect=True)
def test_fp32_packed_weight_matches_the_exact_product(packing):
    """fp32: oneDNN's sums, in another order than MKL's F.linear: against the fp64 product."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 40, generator=g)
    param = _with_packed(w)
    for rows in (1, 16, 300):
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(gemm.linear(x, param), x.double().matmul(w.double().t()).float(), atol=1e-5,
                                   rtol=1e-5)
    assert gemm.pack_for_cpu(torch.randn(8, 4, 2)) is None  # not a matrix
    assert gemm.pack_for_cpu(torch.randn(8, 4).to(torch.int8)) is None  # not a float weight


@pytest.mark.parametrize("packing", ["0"], indirect=True)
def test_packing_off(packing):
    assert gemm.pack_for_cpu(torch.randn(8, 4).bfloat16()) is None


@pytest.mark.parametrize("packing", ["yes"], indirect=True)
def test_bad_packing_setting_is_named(packing):
    with pytest.raises(ValueError, match="RTLLM_CPU_PACKED_WEIGHTS='yes'"):
        gemm.pack_for_cpu(torch.randn(8, 4).bfloat16())


def test_engine_packs_its_gemm_weights_and_keeps_its_bits(tmp_path, monkeypatch):
    """bf16 engine on a tied tiny Llama: every Linear weight and the LM head (the embedding's parameter)
    carry a packed copy, the embedding still looks its rows up in the dense weight, and the logits and
    greedy tokens are those of the same engine with packing off."""
    make_checkpoint(str(tmp_path), "llama", tie_word_embeddings=True)
    prompts = ramp_prompts(3, seed=12, lo=3, hi=60)
    greedy = SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("RTLLM_CPU_PACKED_WEIGHTS", mode)
        if mode == "1" and not _packs(torch.bfloat16):
            pytest.skip("this CPU's oneDNN packs no bf16 weights")
        engine = make_engine(str(tmp_path), dtype="bfloat16")
        model = engine.loaded.model
        weights = [m.weight for m in model.modules() if isinstance(m, Linear)] + [model.lm_head.weight]
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all((getattr(w, "cpu_packed", None) is not None) == (mode == "1") for w in weights)
        results[mode] = (engine_last_logits(engine, prompts[0]), run_engine(engine, prompts, greedy))
    assert torch.equal(results["0"][0], results["1"][0])
    assert results["0"][1] == results["1"][1]


def test_fp32_engine_with_packed_weights_matches_transformers(tmp_path):
    """fp32, untied Qwen3: greedy tokens equal to transformers' generate and last logits within 1e-4, with
    every Linear and the LM head packed."""
    if not _packs(torch.float32):
        pytest.skip("this CPU's oneDNN packs no fp32 weights")
    hf = make_checkpoint(str(tmp_path), "qwen3", tie_word_embeddings=False)
    engine = make_engine(str(tmp_path))
    model = engine.loaded.model
    assert all(getattr(m.weight, "cpu_packed", None) is not None for m in model.modules() if isinstance(m, Linear))
    assert getattr(model.lm_head.weight, "cpu_packed", None) is not None
    assert getattr(model.model.embed_tokens.weight, "cpu_packed", None) is None  # lookups only
    _matches_transformers(engine, hf, seed=13)
