"""The dense weights' memory layout (rtllm.kernels.gemm.fast_weight_layout): on a CPU whose fp32 GEMM
reads a column-major weight faster, the runner stores Linear / embedding / LM-head weights so; the
values, shapes and results stay transformers' (the oracle)."""

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


@pytest.mark.parametrize("layout", ["row", "column"], indirect=True)
def test_engine_with_each_layout_matches_transformers(tmp_path, layout):
    hf = make_checkpoint(str(tmp_path), "llama", tie_word_embeddings=True)
    engine = make_engine(str(tmp_path))
    model = engine.loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, laid out once
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    want_col = layout == "column"
    for w in [m.weight for m in linears] + [model.lm_head.weight]:
        assert (w.stride(0) == 1 and w.stride(1) == w.shape[0]) == want_col
    prompts = ramp_prompts(3, seed=11, lo=3, hi=60)
    greedy = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    for p, o in zip(prompts, run_engine(engine, prompts, greedy)):
        assert o == hf_greedy(hf, p, 24)
    ref = hf(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(engine_last_logits(engine, prompts[0]), ref, atol=1e-4, rtol=0)
