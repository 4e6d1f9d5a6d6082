"""Options that meet a model split across ranks: exclude_modules on a pipeline stage (checked against the
whole model, tied embeddings kept together), tensor_parallel_size="auto" under a launcher and on an engine
built for several ranks, and calibrated FP8 KV scales (one-rank only) at build time."""

import pytest

from rtllm.builder import BuildConfig, build
from rtllm.errors import ConfigError
from rtllm.layers.embedding import LMHead, VocabEmbedding
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.quantization import QuantConfig
from tests.tiny import tied_and_untied


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tied_and_untied(tmp_path_factory)


def _stage(path, rank, qc):
    return load_model(path, "float32", "cpu", quant_config=qc, mapping=Mapping(2, 1, 2, rank=rank)).model


def _dense(model):
    return {n for n, m in model.named_modules() if isinstance(m, (Linear, VocabEmbedding, LMHead))
            and not isinstance(m, QuantizedLinear)}


def test_exclude_modules_on_pipeline_stages(ckpts):
    qc = QuantConfig("W8A16", exclude_modules=["embed_tokens", "lm_head", "model.layers.1.mlp.down_proj"])
    first, last = _stage(ckpts["untied"], 0, qc), _stage(ckpts["untied"], 1, qc)
    assert _dense(first) == {"model.embed_tokens"}  # layer 0's linears quantized; layer 1 lives on rank 1
    assert _dense(last) == {"lm_head", "model.layers.1.mlp.down_proj"}
    with pytest.raises(ConfigError, match=r"\['lm_haed'\] match no module"):  # a typo is still named
        _stage(ckpts["untied"], 0, QuantConfig("W8A16", exclude_modules=["lm_haed"]))


def test_tied_embedding_excluded_on_one_stage_keeps_both(ckpts):
    qc = QuantConfig("W8A16", exclude_modules=["lm_head"])
    assert "model.embed_tokens" in _dense(_stage(ckpts["tied"], 0, qc))
    assert "lm_head" in _dense(_stage(ckpts["tied"], 1, qc))


def test_auto_tp_under_a_launcher_is_the_launch(ckpts, monkeypatch):
    for k, v in dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    args = LlmArgs(ckpts["untied"], device="cpu", tensor_parallel_size="auto", pipeline_parallel_size=2)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)


def test_auto_tp_on_an_engine_takes_its_whole_mapping(ckpts, tmp_path):
    eng = build(ckpts["untied"], BuildConfig(max_batch_size=8, max_num_tokens=64, dtype="float32", pp_size=2),
                str(tmp_path / "pp2"), device="cpu").output_dir
    args = LlmArgs(eng, device="cpu", tensor_parallel_size="auto")
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (1, 2)


def test_calibrated_kv_scales_need_one_rank(ckpts, tmp_path):
    qc = QuantConfig(kv_cache_quant_algo="FP8", kv_cache_scales="calibrate")
    with pytest.raises(ConfigError, match="kv_cache_scales='calibrate' is not supported for an engine split"):
        build(ckpts["untied"], BuildConfig(max_batch_size=8, max_num_tokens=64, quant_config=qc, tp_size=2),
              str(tmp_path / "x"), device="cpu")
