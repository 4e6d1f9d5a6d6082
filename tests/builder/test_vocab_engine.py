"""Engine directories with the INT8 embedding / LM head: stored and reloaded as they are.

Oracle: the checkpoint loaded with the same quant_config (quantized at load). A tied pair must be
stored once and held by both layers again after loading; builds stay byte-identical; exclude_modules
is part of the stored quant config.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from rtllm.builder import BuildConfig, build
from rtllm.errors import ConfigError, ModelLoadError
from rtllm.layers.embedding import LMHead
from rtllm.layers.quant import Int8Embedding, W8A16Linear
from rtllm.models.engine_dir import CONFIG_NAME, WEIGHTS_NAME
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig
from tests.tiny import engine_last_logits, make_checkpoint, make_engine, ramp_prompts, tied_and_untied

LIMITS = dict(max_batch_size=8, max_num_tokens=256, max_input_len=128, max_seq_len=512)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tied_and_untied(tmp_path_factory)


def _same_model(ref, eng) -> None:
    ref_params, eng_params = dict(ref.model.named_parameters()), dict(eng.model.named_parameters())
    assert ref_params.keys() == eng_params.keys()
    for name, p in ref_params.items():
        assert p.dtype == eng_params[name].dtype and torch.equal(p, eng_params[name]), name
    assert eng.weight_bytes == ref.weight_bytes


def _greedy(loaded, path):
    from rtllm.sampling_params import SamplingParams
    from tests.tiny import run_engine

    return run_engine(make_engine(path, loaded=loaded), ramp_prompts(3, seed=2, hi=30),
                      SamplingParams(max_tokens=12, temperature=0))


@pytest.mark.parametrize("tie", ["untied", "tied"])
@pytest.mark.parametrize("qc", [QuantConfig("W8A16"), QuantConfig("W4A16", 32)], ids=lambda q: q.quant_algo)
def test_int8_vocab_round_trip(ckpts, tmp_path, tie, qc):
    src = ckpts[tie]
    out = str(tmp_path / "engine")
    build(src, BuildConfig(quant_config=qc, **LIMITS), out, device="cpu")
    with open(os.path.join(out, CONFIG_NAME)) as f:
        cfg = json.load(f)
    specs = cfg["quantized_layers"]
    assert specs["model.embed_tokens"]["class"] == "Int8Embedding"
    assert specs["model.embed_tokens"]["attrs"]["out_dtype"] == "float32"
    assert specs["lm_head"]["class"] == "W8A16Linear"
    assert cfg["quant_config"]["exclude_modules"] is None
    from safetensors import safe_open

    with safe_open(os.path.join(out, WEIGHTS_NAME), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.qweight").dtype == torch.int8
    if tie == "tied":  # stored once, under the embedding's names
        assert specs["lm_head"]["tied"] == {"qweight": "model.embed_tokens.qweight",
                                            "scales": "model.embed_tokens.scales"}
        assert not any(n.startswith("lm_head.") for n in names)
    else:
        assert "tied" not in specs["lm_head"] and {"lm_head.qweight", "lm_head.scales"} <= names

    ref = load_model(src, "float32", "cpu", max_positions=512, quant_config=qc)
    eng = load_model(out)
    _same_model(ref, eng)
    emb, head = eng.model.model.embed_tokens, eng.model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, W8A16Linear)
    if tie == "tied":
        assert head.qweight is emb.qweight and head.scales is emb.scales
    prompt = ramp_prompts(1, seed=5, hi=40)[0]
    assert torch.equal(engine_last_logits(make_engine(out, loaded=eng), prompt),
                       engine_last_logits(make_engine(src, loaded=ref), prompt))
    assert _greedy(eng, out) == _greedy(ref, src)


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_int8_vocab_builds_are_byte_identical(ckpts, tmp_path, tie):
    bc = BuildConfig(quant_config=QuantConfig("W8A16"), **LIMITS)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(ckpts[tie], bc, a, device="cpu")
    build(ckpts[tie], bc, b, device="cpu")
    for name in sorted(os.listdir(a)):
        if name == "build_log.json":
            continue
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_excluded_vocab_round_trip_and_mismatch(ckpts, tmp_path):
    src = ckpts["untied"]
    qc = QuantConfig("W8A16", exclude_modules=["lm_head"])
    out = str(tmp_path / "engine")
    build(src, BuildConfig(quant_config=qc, **LIMITS), out, device="cpu")
    with open(os.path.join(out, CONFIG_NAME)) as f:
        cfg = json.load(f)
    assert cfg["quant_config"]["exclude_modules"] == ["lm_head"] and "lm_head" not in cfg["quantized_layers"]
    eng = load_model(out)
    assert type(eng.model.lm_head) is LMHead and isinstance(eng.model.model.embed_tokens, Int8Embedding)
    _same_model(load_model(src, "float32", "cpu", max_positions=512, quant_config=qc), eng)
    load_model(out, quant_config=qc)  # the same config: accepted
    with pytest.raises(ConfigError, match="already quantized as"):
        load_model(out, quant_config=QuantConfig("W8A16"))
    with pytest.raises(ConfigError, match="already quantized as"):
        load_model(out, quant_config=QuantConfig(exclude_modules=["embed_tokens"]))


def test_corrupt_tied_entry_is_a_load_error(ckpts, tmp_path):
    out = str(tmp_path / "engine")
    build(ckpts["tied"], BuildConfig(quant_config=QuantConfig("W8A16"), **LIMITS), out, device="cpu")
    path = os.path.join(out, CONFIG_NAME)
    with open(path) as f:
        cfg = json.load(f)
    cfg["quantized_layers"]["lm_head"]["tied"] = {"qweight": "model.embed_tokens.nope",
                                                  "scales": "model.embed_tokens.scales"}
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelLoadError, match="model.embed_tokens.nope"):
        load_model(out)
    cfg["quantized_layers"]["lm_head"]["tied"] = {"bias": "model.embed_tokens.scales"}
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelLoadError, match="bad 'tied' entry"):
        load_model(out)


def test_prequantized_checkpoint_engine_keeps_int8_vocab(tmp_path):
    from tests.quantization.hub_layouts import make_awq

    dense_hf = make_checkpoint(str(tmp_path / "src"), "llama")
    path = str(tmp_path / "awq")
    make_awq(path, dense_hf, 32)
    out = str(tmp_path / "engine")
    build(path, BuildConfig(**LIMITS), out, device="cpu")
    eng = load_model(out)
    assert isinstance(eng.model.model.embed_tokens, Int8Embedding) and isinstance(eng.model.lm_head, W8A16Linear)
    _same_model(load_model(path, "float32", "cpu", max_positions=512), eng)
