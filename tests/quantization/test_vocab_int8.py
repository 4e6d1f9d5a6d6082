"""The INT8 token embedding and LM head (the default whenever weights are quantized) and exclude_modules.

Oracles: the embedding lookup must equal the rows of ``dequantize_w8(q, s, dtype)`` exactly, with ``q, s``
from ``quantize_w8_per_channel`` of the whole table; the LM head's logits must be within the activation
rounding of ``F.linear`` with the dequantized table; a tied pair must hold one table; the weight bytes
must equal ``estimate_weight_bytes`` (which the memory figures of docs/QUANTIZATION.md come from).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rtllm.errors import ConfigError
from rtllm.layers.embedding import LMHead, VocabEmbedding
from rtllm.layers.linear import Linear
from rtllm.layers.quant import Int8Embedding, W4A16Linear, W8A16Linear
from rtllm.layers.quant import vocab as vocab_mod
from rtllm.layers.quant.vocab import int8_lm_head, quantize_rows
from rtllm.layers.quantized_linear import estimate_weight_bytes
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.int8 import dequantize_w8, quantize_w8_per_channel
from tests.tiny import VOCAB, engine_last_logits, make_checkpoint, make_engine, tied_and_untied

DENSE_VOCAB = ["embed_tokens", "lm_head"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _table(V: int = 300, H: int = 64) -> torch.Tensor:
    """Rows of very different magnitudes (per-row scales matter), one all-zero row."""
    w = torch.randn(V, H, generator=_gen(0)) * torch.logspace(-3, 1, V)[:, None]
    w[7] = 0
    return w


def _embedding(w: torch.Tensor, dtype: torch.dtype) -> VocabEmbedding:
    e = VocabEmbedding(*w.shape)
    e.weight.data = w.to(dtype)
    return e


# -- the layers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lookup_equals_dequantized_rows(dtype):
    w = _table()
    emb = _embedding(w, dtype)
    q = Int8Embedding.from_embedding(emb)
    q_ref, s_ref = quantize_w8_per_channel(emb.weight)
    assert q.qweight.dtype == torch.int8 and torch.equal(q.qweight, q_ref) and torch.equal(q.scales, s_ref)
    assert q.scales[7] == 1 and not q.qweight[7].any()
    ids = torch.randint(0, w.shape[0], (3, 11), generator=_gen(1))
    ids[0, :3] = 7  # repeats and the zero row
    out = q(ids)
    want = dequantize_w8(q_ref, s_ref, dtype)[ids]
    assert out.dtype == dtype and out.shape == (3, 11, w.shape[1])
    assert torch.equal(out, want)
    assert torch.equal(q.dequantized_weight(dtype)[ids], want)
    # and it is the table within half a step per row (+ the dtype's rounding)
    step = s_ref[ids][..., None]
    assert ((out.float() - emb.weight.float()[ids]).abs() <= 0.5 * step + 2**-7 * out.float().abs()).all()


def test_chunked_quantization_is_exact(monkeypatch):
    w = _table(1000, 32).bfloat16()
    monkeypatch.setattr(vocab_mod, "_ROWS_PER_CHUNK", 37)
    q, s = quantize_rows(w)
    q_ref, s_ref = quantize_w8_per_channel(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 40])  # 40 > 16 rows: the W8A16 GEMM's dense path
def test_lm_head_logits_match_dequantized_linear(dtype, M):
    w = _table(260, 64)
    head = LMHead(*w.shape)
    head.weight.data = w.to(dtype)
    new = int8_lm_head(head)
    assert isinstance(new, W8A16Linear) and (new.in_features, new.out_features) == (64, 260)
    x = torch.randn(M, 64, generator=_gen(M)).to(dtype)
    got = new(x)
    want = F.linear(x.float(), dequantize_w8(new.qweight, new.scales))
    assert got.dtype == dtype and got.shape == (M, 260)
    # the CPU kernel takes bf16 activations and rounds the logits to bf16: ~2^-8 of their range
    err = (got.float() - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item(), err
    # and the int8 table is what moves the logits away from the dense head, not the kernel
    dense_err = (F.linear(x.float(), head.weight.float()) - want).abs().max().item()
    assert err <= dense_err, (err, dense_err)


def test_lm_head_3d_input_and_tied_parameters():
    w = _table(260, 64)
    emb = Int8Embedding.from_embedding(_embedding(w, torch.float32))
    head = int8_lm_head(LMHead(*w.shape), emb)
    assert head.qweight is emb.qweight and head.scales is emb.scales
    x = torch.randn(2, 3, 64, generator=_gen(2))
    assert head(x).shape == (2, 3, 260)


# -- in a model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tied_and_untied(tmp_path_factory)


def _load(path, qc=None):
    from rtllm.models.loader import load_model

    return load_model(path, "float32", "cpu", max_positions=512, quant_config=qc)


FORMATS = [QuantConfig("FP8"), QuantConfig("W8A16"), QuantConfig("W4A16", 32), QuantConfig("NVFP4")]


@pytest.mark.parametrize("tie", ["untied", "tied"])
@pytest.mark.parametrize("qc", FORMATS, ids=lambda q: q.quant_algo)
def test_every_format_stores_int8_vocab_and_bytes_match_estimate(ckpts, tie, qc):
    dense = _load(ckpts[tie])
    q = _load(ckpts[tie], qc)
    emb, head = q.model.model.embed_tokens, q.model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, W8A16Linear)
    assert emb.out_dtype == "float32"
    d_emb = dense.model.model.embed_tokens.weight
    assert torch.equal(emb.qweight, quantize_w8_per_channel(d_emb)[0])
    names = [n for n, _ in q.model.named_parameters() if "embed" in n or "lm_head" in n]
    if tie == "tied":  # one table: held by both modules, stored and counted once
        assert head.qweight is emb.qweight and head.scales is emb.scales
        assert names == ["model.embed_tokens.qweight", "model.embed_tokens.scales"]
    else:
        assert torch.equal(head.qweight, quantize_w8_per_channel(dense.model.lm_head.weight)[0])
        assert names == ["model.embed_tokens.qweight", "model.embed_tokens.scales", "lm_head.qweight",
                         "lm_head.scales"]
    assert q.weight_bytes == estimate_weight_bytes(dense.model, qc, "cpu")
    # the vocabulary part: V * H bytes + a fp32 scale per row, once or twice
    no_vocab = estimate_weight_bytes(dense.model, dataclasses.replace(qc, exclude_modules=DENSE_VOCAB), "cpu")
    V, H = d_emb.shape
    tables = 1 if tie == "tied" else 2
    assert no_vocab - q.weight_bytes == tables * (V * H * 4 - V * H - 4 * V)


def test_quantized_model_logits_close_to_dequantized_vocab(ckpts):
    """The whole model with only the vocabulary INT8 (linear layers excluded) against the dense model
    holding the dequantized tables: the lookup is exact, so the logits differ by the LM head's bf16
    activation / logit rounding only."""
    path = ckpts["untied"]
    q = _load(path, QuantConfig("W8A16", exclude_modules=["model.layers"]))
    assert not any(isinstance(m, W8A16Linear) for n, m in q.model.named_modules() if n != "lm_head")
    ref = _load(path)
    with torch.no_grad():
        ref.model.model.embed_tokens.weight.copy_(q.model.model.embed_tokens.dequantized_weight())
        ref.model.lm_head.weight.copy_(dequantize_w8(q.model.lm_head.qweight, q.model.lm_head.scales))
    dense = _load(path)
    prompt = torch.randint(0, 256, (30,), generator=_gen(3)).tolist()
    got, want, base = (engine_last_logits(make_engine(path, loaded=m), prompt) for m in (q, ref, dense))
    err, quant_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert err <= 1e-2 * want.abs().max().item() and err < quant_err, (err, quant_err)


def test_perplexity_on_a_quantized_model_uses_the_model_dtype(ckpts):
    from rtllm.models.forward import perplexity, prefill_hidden

    q = _load(ckpts["tied"], QuantConfig("W8A16"))
    ids = torch.randint(0, 256, (40,), generator=_gen(4)).tolist()
    h = prefill_hidden(q.model, [ids[:10]])[0]
    assert h.dtype == torch.float32  # the KV cache and activations in the model dtype, not int8
    assert 1 < perplexity(q.model, ids, window=20) < 10 * VOCAB


def test_engine_reports_int8_bytes(ckpts):
    from rtllm import LLM

    path = ckpts["untied"]
    with LLM(path, dtype="float32", device="cpu", executor_type="inprocess", quant_config=QuantConfig("W8A16"),
             max_seq_len=128) as llm:
        info = llm.executor.engine_info
    q = _load(path, QuantConfig("W8A16"))
    assert info["weight_bytes"] == q.weight_bytes
    assert info["embedding_bytes"] == VOCAB * 64  # int8: one byte a weight


# -- exclude_modules -----------------------------------------------------------------------------

def test_exclude_modules_keeps_them_in_the_model_dtype(ckpts):
    dense = _load(ckpts["untied"])
    q = _load(ckpts["untied"], QuantConfig("W8A16", exclude_modules=["lm_head"]))
    assert isinstance(q.model.model.embed_tokens, Int8Embedding) and type(q.model.lm_head) is LMHead
    assert torch.equal(q.model.lm_head.weight, dense.model.lm_head.weight)
    q = _load(ckpts["untied"], QuantConfig("W8A16", exclude_modules=["embed_tokens"]))
    assert type(q.model.model.embed_tokens) is VocabEmbedding and isinstance(q.model.lm_head, W8A16Linear)
    q = _load(ckpts["untied"], QuantConfig("W8A16", exclude_modules=DENSE_VOCAB))
    assert type(q.model.model.embed_tokens) is VocabEmbedding and type(q.model.lm_head) is LMHead
    assert all(torch.equal(q.model.get_parameter(n), dense.model.get_parameter(n))
               for n in ("model.embed_tokens.weight", "lm_head.weight"))
    # globs and containing modules reach linear layers too
    q = _load(ckpts["untied"], QuantConfig("W4A16", 32, exclude_modules=["*.down_proj", "model.layers.0"]))
    layers = q.model.model.layers
    assert type(layers[1].mlp.down_proj) is Linear and isinstance(layers[1].mlp.gate_up_proj, W4A16Linear)
    assert not any(isinstance(m, W4A16Linear) for m in layers[0].modules())
    assert isinstance(q.model.lm_head, W8A16Linear)


def test_excluding_either_of_a_tied_pair_keeps_the_shared_table(ckpts):
    for pattern in ("lm_head", "embed_tokens"):
        q = _load(ckpts["tied"], QuantConfig("FP8", exclude_modules=[pattern]))
        emb, head = q.model.model.embed_tokens, q.model.lm_head
        assert type(emb) is VocabEmbedding and type(head) is LMHead and head.weight is emb.weight


def test_bad_exclude_modules_are_errors_naming_them(ckpts):
    for bad in ("lm_head", [""], [" lm_head"], [3], {"lm_head": 1}):
        with pytest.raises(ConfigError, match=r"QuantConfig\.exclude_modules="):
            QuantConfig("W8A16", exclude_modules=bad)
    with pytest.raises(ConfigError, match=r"QuantConfig\.exclude_modules: \['lm_haed'\] match no module"):
        _load(ckpts["untied"], QuantConfig("W8A16", exclude_modules=["lm_head", "lm_haed"]))
    with pytest.raises(ConfigError, match=r"\['\*\.q_proj'\].*qkv_proj"):  # the fused name is qkv_proj
        _load(ckpts["untied"], QuantConfig("W8A16", exclude_modules=["*.q_proj"]))
    dense = _load(ckpts["untied"])
    with pytest.raises(ConfigError, match="nope"):
        estimate_weight_bytes(dense.model, QuantConfig("W8A16", exclude_modules=["nope"]))


def test_quant_config_exclude_modules_fields():
    qc = QuantConfig("w8a16", exclude_modules=("lm_head",))
    assert qc.exclude_modules == ["lm_head"] and dataclasses.asdict(qc)["exclude_modules"] == ["lm_head"]
    assert QuantConfig(**dataclasses.asdict(qc)) == qc
    assert qc.excludes("lm_head") and not qc.excludes("model.embed_tokens")
    qc = QuantConfig("FP8", exclude_modules=["embed_tokens", "layers.1", "*.o_proj"])
    assert qc.excludes("model.embed_tokens") and qc.excludes("model.layers.1.mlp.down_proj")
    assert qc.excludes("model.layers.0.self_attn.o_proj") and not qc.excludes("model.layers.11.mlp.down_proj")
    assert not qc.excludes("lm_head")
    assert QuantConfig.from_name("fp8", exclude_modules=["lm_head"]).exclude_modules == ["lm_head"]
    assert QuantConfig.from_name("none", exclude_modules=["lm_head"]) == QuantConfig(exclude_modules=["lm_head"])
    assert QuantConfig.from_name("none") is None


# -- pre-quantized checkpoints -------------------------------------------------------------------

def test_prequantized_checkpoint_gets_the_int8_vocab_by_default(tmp_path, ckpts):
    import transformers as tf

    from tests.quantization.hub_layouts import make_awq
    from tests.tiny import hf_config

    dense_hf = make_checkpoint(str(tmp_path / "src"), "llama")
    path = str(tmp_path / "awq")
    oracle_sd = make_awq(path, dense_hf, 32)
    q = _load(path)
    emb, head = q.model.model.embed_tokens, q.model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, W8A16Linear)
    assert isinstance(q.model.model.layers[0].mlp.down_proj, W4A16Linear)
    # the oracle: transformers with the checkpoint's dequantized linear weights and the INT8 tables
    oracle_sd["model.embed_tokens.weight"] = emb.dequantized_weight()
    oracle_sd["lm_head.weight"] = dequantize_w8(head.qweight, head.scales)
    oracle = tf.AutoModelForCausalLM.from_config(hf_config("llama")).eval()
    oracle.load_state_dict(oracle_sd, strict=False)
    prompt = torch.randint(0, 256, (17,), generator=_gen(5)).tolist()
    got = engine_last_logits(make_engine(path, loaded=q), prompt)
    with torch.no_grad():
        want = oracle(torch.tensor([prompt])).logits[0, -1].float()
    assert (got - want).abs().max() <= 0.015 * want.abs().max()

    kept = _load(path, QuantConfig(exclude_modules=["lm_head"]))
    assert isinstance(kept.model.model.embed_tokens, Int8Embedding) and type(kept.model.lm_head) is LMHead
    # on a pre-quantized checkpoint rtllm quantizes only the embedding and the LM head
    with pytest.raises(ConfigError, match=r"\['\*\.down_proj'\] match no module.*pre-quantized"):
        _load(path, QuantConfig(exclude_modules=["*.down_proj"]))
