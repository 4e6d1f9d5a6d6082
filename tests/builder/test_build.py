"""rtllm build: engine directories against the checkpoint they came from.

Oracle: the same checkpoint loaded with the same quant_config (quantized at load). An engine must
hold exactly the runtime's tensors and give the same greedy tokens, load without quantizing or
calibrating, and refuse a tampered directory with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.cli import main
from rtllm.errors import ConfigError, InvalidRequestError, ModelLoadError
from rtllm.models.engine_dir import CONFIG_NAME, WEIGHTS_NAME, is_engine_dir
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig
from tests.tiny import make_checkpoint, ramp_prompts

QUANTS = {"none": None, "w8a16": QuantConfig("W8A16"), "w4a16": QuantConfig("W4A16")}
LIMITS = dict(max_batch_size=8, max_num_tokens=256, max_input_len=128, max_seq_len=512)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt"))
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="module")
def w8_engine(ckpt, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("w8") / "engine")
    build(ckpt, BuildConfig(quant_config=QuantConfig("W8A16"), **LIMITS), out, device="cpu")
    return out


def _greedy(model: str, quant: QuantConfig | None, prompts) -> list[list[int]]:
    with LLM(model, quant_config=quant, executor_type="inprocess", kv_cache_config=KvCacheConfig(max_tokens=4096),
             max_batch_size=8, max_num_tokens=256) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("quant", list(QUANTS))
def test_engine_equals_quantizing_at_load(ckpt, tmp_path, quant):
    qc = QUANTS[quant]
    out = str(tmp_path / "engine")
    result = build(ckpt, BuildConfig(quant_config=qc, **LIMITS), out, device="cpu")
    assert is_engine_dir(out)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "build_log.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, CONFIG_NAME)) as f:
        cfg = json.load(f)
    classes = {s["class"] for s in cfg["quantized_layers"].values()}
    # quantized: the embedding is INT8 (Int8Embedding) and the LM head a W8A16Linear whatever the format
    assert classes == {"none": set(), "w8a16": {"W8A16Linear", "Int8Embedding"},
                       "w4a16": {"W4A16Linear", "W8A16Linear", "Int8Embedding"}}[quant]
    assert result.log["timings_s"]["total"] > 0 and result.log["sizes_bytes"]["weights_file"] > 0

    # the stored tensors are the runtime's: fused, quantized, bit for bit
    ref = load_model(ckpt, quant_config=qc)
    eng = load_model(out)
    ref_params, eng_params = dict(ref.model.named_parameters()), dict(eng.model.named_parameters())
    assert ref_params.keys() == eng_params.keys()
    assert any("qkv_proj" in n for n in eng_params) and any("gate_up_proj" in n for n in eng_params)
    for name, p in ref_params.items():
        assert p.dtype == eng_params[name].dtype and torch.equal(p, eng_params[name]), name
    assert eng.weight_bytes == ref.weight_bytes

    prompts = ramp_prompts(4, seed=1, hi=40)
    assert _greedy(out, None, prompts) == _greedy(ckpt, qc, prompts)


def test_engine_load_skips_quantization_and_calibration(ckpt, tmp_path, monkeypatch):
    qc = QuantConfig("W4A16_AWQ", calib_size=2, calib_max_seq_length=64)
    out = str(tmp_path / "awq")
    build(ckpt, BuildConfig(quant_config=qc, **LIMITS), out, device="cpu")
    ref = load_model(ckpt, quant_config=qc)

    def boom(*a, **k):
        raise AssertionError("an engine directory must not be quantized or calibrated again")

    import rtllm.layers.quantized_linear
    import rtllm.models.calibration
    import rtllm.models.loader

    monkeypatch.setattr(rtllm.models.loader, "quantize_model", boom)
    monkeypatch.setattr(rtllm.models.loader, "quantize_linear_layers", boom)
    monkeypatch.setattr(rtllm.layers.quantized_linear, "quantize_linear_layers", boom)
    monkeypatch.setattr(rtllm.models.calibration, "apply_awq", boom)
    eng = load_model(out, quant_config=qc)  # the same quant_config is accepted: nothing to do
    for name, p in ref.model.named_parameters():
        assert torch.equal(p, eng.model.get_parameter(name)), name


def test_same_inputs_give_identical_files(ckpt, tmp_path):
    bc = BuildConfig(quant_config=QuantConfig("W4A16"), **LIMITS)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(ckpt, bc, a, device="cpu")
    build(ckpt, bc, b, device="cpu")
    for name in sorted(os.listdir(a)):
        if name == "build_log.json":  # timings and paths
            continue
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


# -- BuildConfig ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"max_batch_size": 0}, "max_batch_size", "positive integer"),
    ({"max_batch_size": True}, "max_batch_size", "positive integer"),
    ({"max_input_len": -1}, "max_input_len", "positive integer"),
    ({"max_num_tokens": 1.5}, "max_num_tokens", "positive integer"),
    ({"max_seq_len": 0}, "max_seq_len", "positive integer"),
    ({"opt_num_tokens": "8"}, "opt_num_tokens", "positive integer"),
    ({"max_beam_width": 4}, "max_beam_width", "only 1"),
    ({"max_beam_width": 0}, "max_beam_width", "positive integer"),
    ({"tp_size": 2, "moe_ep_size": 4}, "moe_ep_size", "must divide tp_size=2"),
    ({"tp_size": 0}, "tp_size", "positive integer"),
    ({"tokens_per_block": 24}, "tokens_per_block", "power of two"),
    ({"dtype": "int8"}, "dtype", "one of"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype", "one of"),
    ({"quant_config": "fp8"}, "quant_config", "QuantConfig"),
    # cross-field rules
    ({"max_input_len": 2048, "max_seq_len": 1024}, "max_input_len", "<= max_seq_len=1024"),
    ({"max_batch_size": 64, "max_num_tokens": 32}, "max_num_tokens", ">= max_batch_size=64"),
    ({"opt_num_tokens": 9000}, "opt_num_tokens", "<= max_num_tokens=8192"),
    ({"tune_kernels": "yes"}, "tune_kernels", "True or False"),
])
def test_build_config_rejects(kwargs, field, allowed):
    with pytest.raises(ConfigError) as e:
        BuildConfig(**kwargs)
    msg = str(e.value)
    assert f"BuildConfig.{field}={kwargs[field]!r}" in msg and allowed in msg, msg


def test_build_config_defaults_and_round_trip():
    bc = BuildConfig()
    assert (bc.max_batch_size, bc.max_input_len, bc.max_seq_len, bc.max_num_tokens, bc.max_beam_width) == \
        (2048, 1024, None, 8192, 1)
    assert bc.resolve(4096).max_seq_len == 4096
    fp8kv = BuildConfig(kv_cache_dtype="fp8", quant_config=QuantConfig("W8A16"))
    assert fp8kv.quant_config.kv_cache_quant_algo == "FP8" and fp8kv.quant_config.quant_algo == "W8A16"
    assert BuildConfig.from_dict(fp8kv.to_dict()) == fp8kv
    with pytest.raises(ConfigError, match="unknown fields.*max_beams"):
        BuildConfig.from_dict({"max_beams": 2})


def test_build_config_checked_against_the_model(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"max_seq_len=2048.*max_position_embeddings=1024"):
        build(ckpt, BuildConfig(max_seq_len=2048), str(tmp_path / "e"), device="cpu")
    with pytest.raises(ConfigError, match=r"max_input_len=1024: must be <= max_seq_len=512"):
        BuildConfig(max_seq_len=512).resolve(1024)
    assert not os.path.exists(tmp_path / "e" / CONFIG_NAME)


def test_build_refuses_bad_targets(ckpt, w8_engine, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an engine directory"):
        build(ckpt, BuildConfig(**LIMITS), str(busy), device="cpu")
    with pytest.raises(ConfigError, match="already an engine directory"):
        build(w8_engine, BuildConfig(**LIMITS), str(tmp_path / "again"), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        build(str(tmp_path / "nope"), BuildConfig(), str(tmp_path / "x"), device="cpu")


# -- runtime limits from the build ---------------------------------------------------------------

def test_llm_takes_limits_from_the_build(ckpt, tmp_path):
    out = str(tmp_path / "engine")
    build(ckpt, BuildConfig(tokens_per_block=16, **LIMITS), out, device="cpu")
    with LLM(out, executor_type="inprocess", kv_cache_config=None) as llm:
        assert (llm.args.max_batch_size, llm.args.max_num_tokens, llm.args.max_seq_len) == (8, 256, 512)
        assert llm.executor.engine_info["tokens_per_block"] == 16
        assert llm.executor.engine_info["max_seq_len"] == 512
        with pytest.raises(InvalidRequestError, match="max_input_len=128"):
            llm.generate([1] * 129, GREEDY)
        assert len(llm.generate([1] * 128, GREEDY).outputs[0].token_ids) == 16
    with pytest.raises(ConfigError, match=r"max_batch_size=16: .*built with max_batch_size=8"):
        LLM(out, executor_type="inprocess", max_batch_size=16)
    with pytest.raises(ConfigError, match=r"max_seq_len=1024: .*built with max_seq_len=512"):
        LLM(out, executor_type="inprocess", max_seq_len=1024)
    with LLM(out, executor_type="inprocess", max_batch_size=4, max_seq_len=256) as llm:  # lower is fine
        assert (llm.args.max_batch_size, llm.args.max_seq_len) == (4, 256)


# -- damaged engine directories ------------------------------------------------------------------

def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: str, **changes) -> None:
    p = os.path.join(path, CONFIG_NAME)
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def _rewrite_weights(path: str, drop: str) -> None:
    p = os.path.join(path, WEIGHTS_NAME)
    tensors = load_file(p)
    del tensors[drop]
    save_file(tensors, p)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        cfg = json.load(f)
    _edit_config(path, weights={**cfg["weights"], "bytes": os.path.getsize(p)})


def test_wrong_version_is_refused(w8_engine, tmp_path):
    eng = _copy(w8_engine, tmp_path)
    _edit_config(eng, format_version=99)
    with pytest.raises(ModelLoadError, match=r"engine format version 99 .*reads version 1.*rebuild"):
        load_model(eng)
    with pytest.raises(ModelLoadError, match="format version 99"):
        LLM(eng, executor_type="inprocess")


@pytest.mark.parametrize("drop", ["model.layers.1.self_attn.qkv_proj.qweight", "model.norm.weight"])
def test_missing_tensor_is_refused(w8_engine, tmp_path, drop):
    eng = _copy(w8_engine, tmp_path)
    _rewrite_weights(eng, drop)
    with pytest.raises(ModelLoadError, match=rf"tensor '{drop}' is missing"):
        load_model(eng)


def test_truncated_or_missing_weights_are_refused(w8_engine, tmp_path):
    eng = _copy(w8_engine, tmp_path)
    p = os.path.join(eng, WEIGHTS_NAME)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(eng)
    os.remove(p)
    with pytest.raises(ModelLoadError, match="weights .* are missing"):
        load_model(eng)


def test_damaged_config_is_refused(w8_engine, tmp_path):
    eng = _copy(w8_engine, tmp_path)
    with open(os.path.join(eng, CONFIG_NAME)) as f:
        cfg = json.load(f)
    layer = "model.layers.0.mlp.down_proj"
    specs = cfg["quantized_layers"]
    _edit_config(eng, quantized_layers={**specs, layer: {**specs[layer], "class": "Int3Linear"}})
    with pytest.raises(ModelLoadError, match="unknown quantized layer class 'Int3Linear'"):
        load_model(eng)
    _edit_config(eng, quantized_layers=specs, device="cuda")
    with pytest.raises(ModelLoadError, match="built for 'cuda'"):
        load_model(eng)
    _edit_config(eng, device="cpu", tp_size=2)
    with pytest.raises(ModelLoadError, match="an engine for 2 ranks must list 2 'ranks' entries"):
        load_model(eng)
    del cfg["pretrained_config"]
    with open(os.path.join(eng, CONFIG_NAME), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ModelLoadError, match=r"lacks \['pretrained_config'\]"):
        load_model(eng)


def test_conflicting_load_options_are_refused(w8_engine):
    with pytest.raises(ConfigError, match="built with dtype 'float32'"):
        load_model(w8_engine, dtype="bfloat16")
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(w8_engine, quant_config=QuantConfig("W4A16"))


# -- command line -----------------------------------------------------------------------------

def test_cli_build_then_generate(ckpt, tmp_path, capsys):
    out = str(tmp_path / "cli-engine")
    rc = main(["build", "--model", ckpt, "--quant", "w8a16", "--max-batch-size", "8", "--max-num-tokens", "64",
               "--max-input-len", "64", "--max-seq-len", "128", "--device", "cpu", "--output", out])
    assert rc == 0
    assert "built" in capsys.readouterr().out
    with open(os.path.join(out, CONFIG_NAME)) as f:
        cfg = json.load(f)
    assert cfg["build_config"]["max_batch_size"] == 8 and cfg["quant_config"]["quant_algo"] == "W8A16"
    # generate in the default (multi-process) executor: the worker loads the engine directory
    assert main(["generate", "--model", out, "--raw", "--json", "--max-tokens", "6", "Hello"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with LLM(ckpt, quant_config=QuantConfig("W8A16"), executor_type="inprocess") as llm:
        want = llm.generate("Hello", SamplingParams(max_tokens=6, temperature=0.0)).outputs[0].token_ids
    assert got["token_ids"] == want


def test_cli_build_refuses_a_mapping_the_model_cannot_take(ckpt, tmp_path, capsys):
    rc = main(["build", "--model", ckpt, "--tp", "3", "--output", str(tmp_path / "tp3")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "tp_size=3 does not fit" in err and "num_attention_heads=4 must be divisible by tp_size" in err


def test_engine_built_with_fp8_kv_keeps_an_fp8_cache(ckpt, tmp_path):
    """kv_cache_dtype="fp8" is part of the engine: LLM(engine_dir) runs an e4m3 pool without being
    told again, and gives the tokens of the checkpoint loaded with kv_cache_quant_algo="FP8"."""
    out = str(tmp_path / "engine")
    build(ckpt, BuildConfig(kv_cache_dtype="fp8", **LIMITS), out, device="cpu")
    prompts = ramp_prompts(3, 12)
    with LLM(out, executor_type="inprocess", kv_cache_config=KvCacheConfig(max_tokens=4096)) as llm:
        assert llm.executor.engine.kv_dtype == torch.float8_e4m3fn
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == _greedy(ckpt, QuantConfig(kv_cache_quant_algo="FP8"), prompts)
