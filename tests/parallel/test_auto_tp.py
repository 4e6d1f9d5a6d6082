"""tensor_parallel_size="auto": the choice from fake GPU memory sizes and head counts (no GPU needed),
the error when nothing fits, weight bytes from a config against the loaded model, LlmArgs and the CLI."""

import logging
from types import SimpleNamespace

import pytest
import torch

from rtllm import cli
from rtllm.errors import ConfigError
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.models.config import ModelConfig
from rtllm.models.loader import load_model
from rtllm.parallel import auto
from tests.tiny import make_checkpoint

GB = 10**9


def llama8b(**kw):
    """Llama-3.1-8B's shape: 32 heads, 8 KV heads, 14336 MLP, 32 layers."""
    cfg = dict(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, num_hidden_layers=32,
               head_dim=128, hidden_size=4096, vocab_size=128256, tie_word_embeddings=False, architecture="llama")
    cfg.update(kw)
    return SimpleNamespace(**cfg)


def test_smallest_tp_that_fits():
    cfg = llama8b()
    w, kv_tok = 16 * GB, 131072  # bf16 weights; KV bytes per token (bf16, 8 KV heads)
    # one 80 GB GPU holds it
    c = auto.choose_tp(cfg, w, kv_tok, 8192, [80 * GB] * 8)
    assert c.tp == 1 and c.per_gpu_bytes == w + kv_tok * 8192
    # 12 GB free each: 16 GB + 1 GB KV needs two (8.5 GB <= 10.8 GB usable)
    c = auto.choose_tp(cfg, w, kv_tok, 8192, [12 * GB] * 8)
    assert c.tp == 2 and c.per_gpu_bytes == 8 * GB + kv_tok * 4096
    assert "tp=1: needs" in c.tried[0] and "-> 2" in c.describe()
    # 5 GB each: 4.25 GB per GPU at tp=4 (4.5 usable)
    assert auto.choose_tp(cfg, w, kv_tok, 8192, [5 * GB] * 8).tp == 4
    # the fraction kept back matters: at 0.8, 4.25 > 4.0 -> tp=8
    assert auto.choose_tp(cfg, w, kv_tok, 8192, [5 * GB] * 8, usable_fraction=0.8).tp == 8


def test_uses_the_smallest_free_memory_of_the_gpus_it_takes():
    cfg = llama8b()
    # GPU 1 is nearly full: tp=2 (GPUs 0, 1) does not fit, tp=4 takes GPUs 0..3, also with GPU 1
    with pytest.raises(ConfigError, match="does not fit on the 4 visible GPU"):
        auto.choose_tp(cfg, 16 * GB, 131072, 8192, [12 * GB, 1 * GB, 12 * GB, 12 * GB])
    assert auto.choose_tp(cfg, 16 * GB, 131072, 8192, [12 * GB, 12 * GB, 1 * GB, 1 * GB]).tp == 2


def test_heads_must_divide():
    # 12 heads / 4 KV heads: tp=8 does not divide the heads, so 8 is passed over even where it would fit
    cfg = llama8b(num_attention_heads=12, num_key_value_heads=4, intermediate_size=12288)
    with pytest.raises(ConfigError, match="tp=8: tp_size=8 does not fit llama: num_attention_heads=12"):
        auto.choose_tp(cfg, 16 * GB, 131072, 8192, [3 * GB] * 8)
    # 24 heads: tp=8 divides them (KV heads 4 < 8: replicated, a rank keeps one)
    cfg = llama8b(num_attention_heads=24, num_key_value_heads=4, intermediate_size=12288)
    c = auto.choose_tp(cfg, 16 * GB, 65536, 8192, [3 * GB] * 8)
    assert c.tp == 8 and c.per_gpu_bytes == 2 * GB + 65536 * 8192 // 4  # KV split 4 ways, not 8


def test_pipeline_stages_take_gpus_too():
    cfg = llama8b()
    c = auto.choose_tp(cfg, 16 * GB, 131072, 8192, [6 * GB] * 8, pp_size=2)  # tp 2 x pp 2: 4.25 GB each
    assert c.tp == 2
    assert auto.choose_tp(cfg, 16 * GB, 131072, 8192, [3 * GB] * 8, pp_size=4).tp == 2  # 8 GPUs, 2.125 GB each
    with pytest.raises(ConfigError, match="pipeline_parallel_size=4"):  # tp=4 would need 16 GPUs
        auto.choose_tp(cfg, 16 * GB, 131072, 8192, [2 * GB] * 8, pp_size=4)
    with pytest.raises(ConfigError, match="none is visible"):
        auto.choose_tp(cfg, 16 * GB, 131072, 8192, [])


def test_nothing_fits_names_every_size_tried():
    with pytest.raises(ConfigError) as e:
        auto.choose_tp(llama8b(), 140 * GB, 327680, 8192, [20 * GB] * 4)
    msg = str(e.value)
    assert "does not fit on the 4 visible GPU(s)" in msg and "weights 130.39 GiB" in msg
    assert all(f"tp={t}: needs" in msg for t in (1, 2, 4)) and "tp=8" not in msg


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("qwen2", dict(tie_word_embeddings=True)), ("qwen3", {}), ("mixtral", {}),
    ("qwen3_moe", dict(mlp_only_layers=[1])),
])
def test_weight_bytes_from_config_match_the_model(tmp_path, arch, overrides):
    make_checkpoint(str(tmp_path), arch, with_tokenizer=False, **overrides)
    loaded = load_model(str(tmp_path), "float32")
    config = ModelConfig.from_file(str(tmp_path / "config.json"))
    assert auto.model_weight_bytes(config, 4) == loaded.weight_bytes
    assert auto.kv_bytes_per_token(config, 2) == 2 * config.num_hidden_layers * config.num_key_value_heads * \
        config.head_dim * 2
    # quantized linears: fewer bytes, the embedding and norms unchanged
    w8 = auto.model_weight_bytes(config, 2, auto.linear_bytes_per_param(2, "W8A16"))
    w4 = auto.model_weight_bytes(config, 2, auto.linear_bytes_per_param(2, "W4A16", 64))
    assert w4 < w8 < auto.model_weight_bytes(config, 2)


def test_llm_args_auto(tmp_path, monkeypatch, caplog):
    path = str(tmp_path)
    make_checkpoint(path, "llama", with_tokenizer=False)  # 4 heads, 2 KV heads
    config = ModelConfig.from_file(str(tmp_path / "config.json"))
    with caplog.at_level(logging.WARNING):
        args = LlmArgs(path, device="cpu", tensor_parallel_size="auto")
    assert args.tensor_parallel_size == 1 and args.mapping.world_size == 1
    assert "on the CPU" in caplog.text and "using 1" in caplog.text
    # on "GPUs": fp32 weights (auto dtype -> bf16 on CUDA: half the bytes), KV for max_seq_len tokens
    weights = auto.model_weight_bytes(config, 2)
    kv = auto.kv_bytes_per_token(config, 2) * 256
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fits_in_two = (weights // 2 + kv // 2) * 1.25  # tp=1 needs twice that: does not fit 0.9 of it
    monkeypatch.setattr(auto, "visible_gpu_free_bytes", lambda: [int(fits_in_two)] * 4)
    with caplog.at_level(logging.INFO, logger="rtllm.llmapi.llm_args"):
        args = LlmArgs(path, device="cuda", tensor_parallel_size="auto", max_seq_len=256)
    assert args.tensor_parallel_size == 2 and args.mapping.tp_size == 2
    assert args.auto_tp.tp == 2 and args.auto_tp.per_gpu_bytes == weights // 2 + kv // 2
    assert "tensor_parallel_size='auto' -> 2" in caplog.text and "per GPU" in caplog.text
    monkeypatch.setattr(auto, "visible_gpu_free_bytes", lambda: [1000] * 2)
    with pytest.raises(ConfigError, match="does not fit on the 2 visible GPU"):
        LlmArgs(path, device="cuda", tensor_parallel_size="auto", max_seq_len=256)


def test_bad_values():
    with pytest.raises(ConfigError, match="tensor_parallel_size='two': must be a positive integer or 'auto'"):
        LlmArgs("x", device="cpu", tensor_parallel_size="two")
    with pytest.raises(ConfigError, match="num_micro_batches=0"):
        LlmArgs("x", device="cpu", num_micro_batches=0)
    assert cli._tp_size("auto") == "auto" and cli._tp_size("AUTO") == "auto" and cli._tp_size("4") == 4
    with pytest.raises(Exception, match="positive integer or 'auto'"):
        cli._tp_size("many")


def test_cli_tp_auto_on_cpu(tmp_path, capsys):
    path = str(tmp_path)
    make_checkpoint(path, "llama")
    code = cli.main(["generate", "--model", path, "--device", "cpu", "--dtype", "float32", "--tp", "auto",
                     "--max-tokens", "3", "--raw", "--json", "hello"])
    assert code == 0
    assert '"text"' in capsys.readouterr().out


def test_engine_directory_keeps_its_built_tp(tmp_path):
    from rtllm.builder import BuildConfig, build

    src, out = str(tmp_path / "ckpt"), str(tmp_path / "engine")
    make_checkpoint(src, "llama")
    build(src, BuildConfig(max_input_len=64, max_seq_len=128, dtype="float32", tp_size=2), out, device="cpu")
    assert LlmArgs(out, device="cpu", tensor_parallel_size="auto").tensor_parallel_size == 2
