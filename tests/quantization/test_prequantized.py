"""Pre-quantized checkpoints (FP8 / compressed-tensors / ModelOpt, AutoAWQ GEMM, GPTQ) against the dense model
holding the same dequantized weights.

The writers (tests/quantization/hub_layouts.py) follow the published layouts one value at a time, and
the oracle's weights come from the writer's own integers: nothing there calls rtllm's unpacking. A
separate bit-by-bit unpacker checks the writers (and rtllm's vectorized unpacking) against the layout
description.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from rtllm.errors import ConfigError, ModelLoadError
from rtllm.layers.linear import Linear
from rtllm.layers.quant import FP8Linear, W4A16Linear
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.hf_formats import AWQ_PACK_ORDER, gptq_unpack, unpack_awq
from tests.quantization.hub_layouts import (
    dequant_ref,
    make_awq,
    make_fp8,
    make_gptq,
    pack_awq,
    pack_gptq_cols,
    pack_gptq_rows,
    rtn_asym,
    seeded,
    unpack_bits,
)
from tests.quantization.test_formats import _greedy_is_oracle_argmax, fake_quant_e4m3_per_token
from tests.tiny import engine_last_logits, hf_config, make_checkpoint, make_engine

# -- the oracle ------------------------------------------------------------------------------

def _oracle(state_dict: dict[str, torch.Tensor], fp8_activations: bool = False):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_config(hf_config("llama")).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if fp8_activations:  # FP8Linear rounds each input row to e4m3 (dynamic per-token scales)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.register_forward_pre_hook(lambda _m, args: (fake_quant_e4m3_per_token(args[0]),))
    return model


@pytest.fixture(scope="module")
def dense_hf(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("dense")), "llama")


# the layouts are compared with the embedding and LM head kept dense (the INT8 default for pre-quantized
# checkpoints has its own test in test_vocab_int8.py)
DENSE_VOCAB = QuantConfig(exclude_modules=["embed_tokens", "lm_head"])


def _compare(path: str, oracle, dense_hf, rel: float, ratio: float | None):
    """rtllm's logits on the checkpoint vs the oracle's: within ``rel`` of the logit range, and (for
    formats that change the weights visibly) ``ratio`` times closer than the unquantized model."""
    from rtllm.models.loader import load_model

    loaded = load_model(path, "float32", "cpu", max_positions=512, quant_config=DENSE_VOCAB)
    engine = make_engine(path, loaded=loaded)
    for n in (17, 200):  # 200 tokens: the CPU int4 layer's dequantize + dense GEMM path
        prompt = torch.randint(0, 256, (n,), generator=seeded(n)).tolist()
        got = engine_last_logits(engine, prompt)
        with torch.no_grad():
            want = oracle(torch.tensor([prompt])).logits[0, -1].float()
            base = dense_hf(torch.tensor([prompt])).logits[0, -1].float()
        err, quant_err, scale = (got - want).abs().max().item(), (base - want).abs().max().item(), want.abs().max()
        assert err <= rel * scale, (n, err, scale.item())
        if ratio is not None:
            assert err <= ratio * quant_err, (n, err, quant_err)
    return loaded.model


def _unpermuted(layer: W4A16Linear) -> torch.Tensor:
    w = layer.reference_weight()
    if layer.input_perm is None:
        return w
    out = torch.empty_like(w)
    out[:, layer.input_perm] = w
    return out


def _check_w4_weights(model, oracle_sd: dict[str, torch.Tensor], quantized: set[str]) -> None:
    """Each W4A16Linear holds its checkpoint parts' weights, up to the bf16 rounding of scales and zeros."""
    for i in range(2):
        for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
                             ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",))):
            layer = model.get_submodule(f"model.layers.{i}.{fused}")
            head = fused.split(".")[0]
            want = torch.cat([oracle_sd[f"model.layers.{i}.{head}.{p}.weight"] for p in parts])
            if f"model.layers.{i}.{fused}" not in quantized:
                assert type(layer) is Linear or isinstance(layer, Linear)
                torch.testing.assert_close(layer.weight.float(), want, rtol=0, atol=0)
                continue
            assert isinstance(layer, W4A16Linear), type(layer)
            got = _unpermuted(layer)
            assert (got - want).abs().max() <= 2**-6 * want.abs().max(), fused


# -- unpacking -------------------------------------------------------------------------------

def test_writers_and_rtllm_unpack_match_the_bit_layout():
    vals = torch.randint(0, 16, (3, 16), generator=seeded(0))
    awq = pack_awq(vals)
    for r in range(3):
        for c in range(2):
            nibbles = unpack_bits(int(awq[r, c]), 4)
            for i in range(8):  # nibble i holds column 8c + AWQ_PACK_ORDER[i]
                assert nibbles[i] == vals[r, 8 * c + AWQ_PACK_ORDER[i]]
    assert torch.equal(unpack_awq(awq), vals.to(torch.int32))
    for bits in (4, 8):
        rows = torch.randint(0, 2**bits, (32, 8), generator=seeded(bits))
        cols = torch.randint(0, 2**bits, (3, 32), generator=seeded(bits + 1))
        qw, qz = pack_gptq_rows(rows, bits), pack_gptq_cols(cols, bits)
        per = 32 // bits
        for i in range(qw.shape[0]):
            for n in range(8):
                assert unpack_bits(int(qw[i, n]), bits) == rows[per * i:per * i + per, n].tolist()
        for gi in range(3):
            for c in range(qz.shape[1]):
                assert unpack_bits(int(qz[gi, c]), bits) == cols[gi, per * c:per * c + per].tolist()
        q, z = gptq_unpack(qw, qz, bits, zero_offset=0)
        assert torch.equal(q, rows.to(torch.int32)) and torch.equal(z, cols.to(torch.int32))
        # v1 stores zero - 1: every zero point, 0 included, comes back
        _, z1 = gptq_unpack(qw, pack_gptq_cols((cols - 1) & (2**bits - 1), bits), bits, zero_offset=1)
        assert torch.equal(z1, cols.to(torch.int32))


# -- AWQ ---------------------------------------------------------------------------------------

def test_awq_checkpoint(tmp_path, dense_hf):
    from rtllm import LLM, SamplingParams

    path = str(tmp_path)
    dense = {"model.layers.1.mlp.down_proj"}  # modules_to_not_convert: stays 16-bit in the file
    oracle_sd = make_awq(path, dense_hf, 32, dense_layers=dense)
    oracle = _oracle(oracle_sd)
    model = _compare(path, oracle, dense_hf, rel=0.015, ratio=0.2)
    quantized = {f"model.layers.{i}.{n}" for i in range(2)
                 for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} - dense
    _check_w4_weights(model, oracle_sd, quantized)
    assert all(m.group_size == 32 and m.input_perm is None for m in model.modules() if isinstance(m, W4A16Linear))

    prompt = torch.randint(0, 256, (9,), generator=seeded(3)).tolist()
    with LLM(path, dtype="float32", device="cpu", executor_type="inprocess", max_seq_len=256) as llm:
        toks = llm.generate(prompt, SamplingParams(max_tokens=10, min_tokens=10, temperature=0)).outputs[0].token_ids
    _greedy_is_oracle_argmax(oracle, prompt, toks, tol=0.03 * oracle(torch.tensor([prompt])).logits.abs().max().item())


# -- GPTQ --------------------------------------------------------------------------------------

@pytest.mark.parametrize("act_order,sym,v2", [(False, False, False), (True, False, False), (False, True, True),
                                              (True, True, False)])
def test_gptq_4bit_checkpoint(tmp_path, dense_hf, act_order, sym, v2):
    path = str(tmp_path)
    oracle_sd = make_gptq(path, dense_hf, 32, 4, act_order, sym, v2)
    model = _compare(path, _oracle(oracle_sd), dense_hf, rel=0.015, ratio=0.2)
    quantized = {f"model.layers.{i}.{n}" for i in range(2)
                 for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    _check_w4_weights(model, oracle_sd, quantized)
    layers = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    assert len(layers) == 8 and all((m.input_perm is not None) == act_order for m in layers)


def test_gptq_8bit_and_mismatched_act_order_are_dequantized(tmp_path, dense_hf, caplog):
    path = str(tmp_path)
    oracle_sd = make_gptq(path, dense_hf, 32, bits=8)
    with caplog.at_level("WARNING"):
        model = _compare(path, _oracle(oracle_sd), dense_hf, rel=1e-4, ratio=None)  # fp32 dense math
    assert not any(isinstance(m, W4A16Linear) for m in model.modules())
    assert "8-bit GPTQ" in caplog.text and "dequantized" in caplog.text

    # act-order with a different order for k than for q and v: one fused layer cannot gather two ways
    from safetensors.torch import load_file

    path2 = str(tmp_path / "mixed")
    os.makedirs(path2)
    oracle_sd = make_gptq(path2, dense_hf, 32, 4, act_order=True)
    tensors = load_file(os.path.join(path2, "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj"
    K = tensors[f"{name}.g_idx"].numel()
    w = dense_hf.state_dict()[f"{name}.weight"]
    perm = torch.arange(K - 1, -1, -1)  # reversed: differs from q's and v's order
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // 32).to(torch.int32)
    cols = [perm[i:i + 32] for i in range(0, K, 32)]
    q, z, s = rtn_asym(w, cols, 4)
    tensors.update({f"{name}.qweight": pack_gptq_rows(q, 4), f"{name}.qzeros": pack_gptq_cols((z - 1) & 15, 4),
                    f"{name}.scales": s, f"{name}.g_idx": g_idx})
    save_file(tensors, os.path.join(path2, "model.safetensors"))
    oracle_sd[f"{name}.weight"] = dequant_ref(q, z, s, cols)
    with caplog.at_level("WARNING"):
        model = _compare(path2, _oracle(oracle_sd), dense_hf, rel=0.015, ratio=0.2)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "QKVLinear"
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, W4A16Linear)
    assert "different act-order permutations" in caplog.text


# -- FP8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,method", [("tensor", "modelopt"), ("channel", "compressed-tensors"),
                                           ("tensor", "fp8")])
def test_fp8_checkpoint(tmp_path, dense_hf, scheme, method, caplog):
    path = str(tmp_path)
    oracle_sd = make_fp8(path, dense_hf, scheme, method, quantize_lm_head=(method == "fp8"))
    with caplog.at_level("INFO"):
        model = _compare(path, _oracle(oracle_sd, fp8_activations=True), dense_hf, rel=0.015, ratio=None)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 8
    for i in range(2):  # per-tensor scales of q, k, v become the fused layer's per-row scales: exact
        qkv = model.model.layers[i].self_attn.qkv_proj
        want = torch.cat([oracle_sd[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])
        torch.testing.assert_close(qkv.dequantized_weight(), want, rtol=0, atol=0)
    if method == "fp8":  # a quantized LM head is dequantized into the (dense) head
        torch.testing.assert_close(model.lm_head.weight, oracle_sd["lm_head.weight"], rtol=0, atol=0)
    assert "input_scale" in caplog.text and "k_scale" in caplog.text


def test_fp8_block_scales_are_dequantized(tmp_path, dense_hf, caplog):
    path = str(tmp_path)
    oracle_sd = make_fp8(path, dense_hf, "block", "fp8")
    with caplog.at_level("WARNING"):
        model = _compare(path, _oracle(oracle_sd), dense_hf, rel=1e-4, ratio=None)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert "block scales" in caplog.text


# -- errors ------------------------------------------------------------------------------------

def test_errors(tmp_path, dense_hf):
    from rtllm.models.loader import load_model

    path = str(tmp_path)
    make_awq(path, dense_hf, 32)
    with pytest.raises(ConfigError, match=r"QuantConfig\.quant_algo='W4A16'.*already quantized.*'awq'"):
        load_model(path, "float32", "cpu", quant_config=QuantConfig("W4A16", 32))
    load_model(path, "float32", "cpu", quant_config=QuantConfig(kv_cache_quant_algo="FP8"))  # allowed

    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for qc, pattern in [
        ({"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes'.*supported quant_method values: \['fp8', "
                                           r"'compressed-tensors', 'modelopt', 'awq', 'gptq'\]"),
        ({"quant_method": "awq", "version": "gemv", "bits": 4}, r"AutoAWQ GEMM"),
        ({"quant_method": "gptq", "bits": 3}, r"4 or 8 bits"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, r"compressed-tensors FP8"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, r"ModelOpt FP8"),
    ]:
        cfg["quantization_config"] = qc
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        with pytest.raises(ModelLoadError, match=pattern):
            load_model(path, "float32", "cpu")

    # a truncated tensor: the error names the layer
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.scales"] = tensors["model.layers.0.mlp.down_proj.scales"][:, :8].clone()
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.down_proj.*malformed awq"):
        load_model(path, "float32", "cpu")
    del tensors["model.layers.0.mlp.down_proj.scales"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.down_proj.*needs qweight and scales"):
        load_model(path, "float32", "cpu")
