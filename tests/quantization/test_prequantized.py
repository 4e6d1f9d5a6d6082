"""Pre-quantized checkpoints (FP8 / compressed-tensors / ModelOpt, AutoAWQ GEMM, GPTQ) against the dense model
holding the same dequantized weights.

The writers here follow the published layouts (AutoAWQ's ``WQLinear_GEMM`` packing, AutoGPTQ's
``QuantLinear.pack``, compressed-tensors / ModelOpt FP8 tensors), one value at a time, and the oracle's
weights come from the writer's own integers: nothing here calls rtllm's unpacking. A separate bit-by-bit
unpacker checks the writers (and rtllm's vectorized unpacking) against the layout description.
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
from tests.quantization.test_formats import _greedy_is_oracle_argmax, fake_quant_e4m3_per_token
from tests.tiny import engine_last_logits, hf_config, make_checkpoint, make_engine, write_byte_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 (two's complement), as the files store them."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


# -- writers ---------------------------------------------------------------------------------

def rtn_asym(w: torch.Tensor, cols: list[torch.Tensor], bits: int):
    """Round-to-nearest asymmetric quantization of w [N, K] with one (scale, zero point) per row and group
    of input channels ``cols[g]``: (intweight [K, N], zero points int [G, N], scales fp16 [G, N])."""
    N, K = w.shape
    maxq = 2**bits - 1
    q = torch.empty(K, N, dtype=torch.int64)
    z = torch.empty(len(cols), N, dtype=torch.int64)
    s = torch.empty(len(cols), N, dtype=torch.float16)
    for gi, c in enumerate(cols):
        wg = w[:, c].double()
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-8).half()
        zero = torch.round(-lo / scale.double()).clamp(0, maxq)
        q[c] = torch.round(wg / scale.double()[:, None] + zero[:, None]).clamp(0, maxq).long().t()
        z[gi], s[gi] = zero.long(), scale
    return q, z, s


def dequant_ref(q, z, s, cols) -> torch.Tensor:
    """W [N, K] fp32 = (q - z) * s, per group of input channels."""
    K, N = q.shape
    w = torch.empty(N, K, dtype=torch.float64)
    for gi, c in enumerate(cols):
        w[:, c] = ((q[c].double() - z[gi].double()) * s[gi].double()).t()
    return w.float()


def pack_awq(vals: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: [R, C] 4-bit values -> int32 [R, C/8]; nibble i of word c holds column 8c + order[i]."""
    R, C = vals.shape
    out = torch.zeros(R, C // 8, dtype=torch.int64)
    for c in range(C // 8):
        for i in range(8):
            out[:, c] |= vals[:, 8 * c + AWQ_PACK_ORDER[i]].long() << (4 * i)
    return _to_int32(out)


def pack_gptq_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qweight: [K, N] -> int32 [K * bits / 32, N]; value j of word i is row (32/bits) i + j."""
    per = 32 // bits
    K, N = vals.shape
    out = torch.zeros(K // per, N, dtype=torch.int64)
    for i in range(K // per):
        for j in range(per):
            out[i] |= vals[per * i + j].long() << (bits * j)
    return _to_int32(out)


def pack_gptq_cols(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qzeros: [G, N] -> int32 [G, N * bits / 32]; value j of word c is column (32/bits) c + j."""
    per = 32 // bits
    G, N = vals.shape
    out = torch.zeros(G, N // per, dtype=torch.int64)
    for c in range(N // per):
        for j in range(per):
            out[:, c] |= vals[:, per * c + j].long() << (bits * j)
    return _to_int32(out)


def unpack_bits(word: int, bits: int) -> list[int]:
    """The independent reference: the values of one 32-bit word, lowest bits first."""
    u = word & 0xFFFFFFFF
    return [(u >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)]


def write_checkpoint(path: str, hf, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    hf.config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    write_byte_tokenizer(path)


def _linear_names(hf):
    return [f"model.layers.{i}.{lin}" for i in range(hf.config.num_hidden_layers) for lin in LINEARS]


def make_awq(path: str, hf, g: int, dense_layers=()):
    """An AutoAWQ GEMM checkpoint of ``hf``; returns the dequantized state dict (the oracle's weights)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    tensors, oracle = dict(sd), dict(sd)
    for name in _linear_names(hf):
        if name in dense_layers:
            continue
        w = tensors.pop(f"{name}.weight")
        K = w.shape[1]
        cols = [torch.arange(i, i + g) for i in range(0, K, g)]
        q, z, s = rtn_asym(w, cols, 4)
        tensors[f"{name}.qweight"] = pack_awq(q)
        tensors[f"{name}.qzeros"] = pack_awq(z)
        tensors[f"{name}.scales"] = s
        oracle[f"{name}.weight"] = dequant_ref(q, z, s, cols)
    write_checkpoint(path, hf, tensors, {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                         "version": "gemm", "modules_to_not_convert": list(dense_layers) or None})
    return oracle


def make_gptq(path: str, hf, g: int, bits: int = 4, act_order: bool = False, sym: bool = False,
              v2: bool = False):
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    tensors, oracle = dict(sd), dict(sd)
    gen = _gen(7)
    for layer in range(hf.config.num_hidden_layers):
        # act-order: GPTQ visits input channels by decreasing Hessian diagonal, one order per input, so
        # layers that read the same input (q, k, v; gate, up) share it
        perms = {}
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}"
            w = tensors.pop(f"{name}.weight")
            K = w.shape[1]
            inp = lin.split(".")[0] + ("_o" if lin.endswith("o_proj") else "_down" if lin.endswith("down_proj") else "")
            perm = perms.setdefault(inp, torch.randperm(K, generator=gen) if act_order else torch.arange(K))
            g_idx = torch.empty(K, dtype=torch.int32)
            g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
            cols = [perm[i:i + g] for i in range(0, K, g)]
            if sym:  # zero point 2^(bits-1), scale from the absolute max
                maxq = 2**bits - 1
                z0 = 2 ** (bits - 1)
                q = torch.empty(K, w.shape[0], dtype=torch.int64)
                s = torch.empty(len(cols), w.shape[0], dtype=torch.float16)
                for gi, c in enumerate(cols):
                    sc = (w[:, c].abs().amax(1).double() * 2 / maxq).clamp(min=1e-8).half()
                    q[c] = torch.round(w[:, c].double() / sc.double()[:, None] + z0).clamp(0, maxq).long().t()
                    s[gi] = sc
                z = torch.full_like(s, z0, dtype=torch.int64)
            else:
                q, z, s = rtn_asym(w, cols, bits)
            stored_z = z if v2 else (z - 1) & (2**bits - 1)  # v1 stores zero points minus 1
            tensors[f"{name}.qweight"] = pack_gptq_rows(q, bits)
            tensors[f"{name}.qzeros"] = pack_gptq_cols(stored_z, bits)
            tensors[f"{name}.scales"] = s
            tensors[f"{name}.g_idx"] = g_idx
            oracle[f"{name}.weight"] = dequant_ref(q, z, s, cols)
    write_checkpoint(path, hf, tensors, {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": act_order,
                                         "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    return oracle


def make_fp8(path: str, hf, scheme: str, quant_method: str, quantize_lm_head: bool = False):
    """scheme "tensor" (one scale per weight, as ModelOpt / compressed-tensors 'tensor'), "channel"
    ([N, 1], compressed-tensors 'channel') or "block" (HF fine-grained: weight_scale_inv per 32 x 32)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    tensors, oracle = dict(sd), dict(sd)
    names = _linear_names(hf) + (["lm_head"] if quantize_lm_head else [])
    for i, name in enumerate(names):
        w = tensors.pop(f"{name}.weight").double()
        N, K = w.shape
        if scheme == "block":
            s = w.abs().reshape(N // 32, 32, K // 32, 32).amax((1, 3)) / 448
            full = s.repeat_interleave(32, 0).repeat_interleave(32, 1)
        elif scheme == "channel":
            s = w.abs().amax(1, keepdim=True) / 448
            full = s.expand(N, K)
        else:
            s = w.abs().amax().reshape(()) / 448 * 1.25  # not the amax: any scale the file gives must work
            full = s.expand(N, K)
        s, full = s.float(), full.float()  # the file's scales are fp32
        w8 = (w / full).float().to(torch.float8_e4m3fn)
        tensors[f"{name}.weight"] = w8
        tensors[f"{name}.weight_scale_inv" if scheme == "block" else f"{name}.weight_scale"] = s
        tensors[f"{name}.input_scale"] = torch.tensor(0.01 * (i + 1))  # static activation scale (ignored)
        oracle[f"{name}.weight"] = w8.float() * full  # e4m3 values are exact in fp32
    for layer in range(hf.config.num_hidden_layers):  # KV cache scales (ModelOpt / compressed-tensors)
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(1.0)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(1.0)
    if quant_method == "compressed-tensors":
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": scheme, "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}},
            "ignore": ["lm_head"]}
    elif quant_method == "modelopt":
        qc = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
        if scheme == "block":
            qc["weight_block_size"] = [32, 32]
    write_checkpoint(path, hf, tensors, qc)
    return oracle


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


def _compare(path: str, oracle, dense_hf, rel: float, ratio: float | None):
    """rtllm's logits on the checkpoint vs the oracle's: within ``rel`` of the logit range, and (for
    formats that change the weights visibly) ``ratio`` times closer than the unquantized model."""
    from rtllm.models.loader import load_model

    loaded = load_model(path, "float32", "cpu", max_positions=512)
    engine = make_engine(path, loaded=loaded)
    for n in (17, 200):  # 200 tokens: the CPU int4 layer's dequantize + dense GEMM path
        prompt = torch.randint(0, 256, (n,), generator=_gen(n)).tolist()
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
    vals = torch.randint(0, 16, (3, 16), generator=_gen(0))
    awq = pack_awq(vals)
    for r in range(3):
        for c in range(2):
            nibbles = unpack_bits(int(awq[r, c]), 4)
            for i in range(8):  # nibble i holds column 8c + AWQ_PACK_ORDER[i]
                assert nibbles[i] == vals[r, 8 * c + AWQ_PACK_ORDER[i]]
    assert torch.equal(unpack_awq(awq), vals.to(torch.int32))
    for bits in (4, 8):
        rows = torch.randint(0, 2**bits, (32, 8), generator=_gen(bits))
        cols = torch.randint(0, 2**bits, (3, 32), generator=_gen(bits + 1))
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

    prompt = torch.randint(0, 256, (9,), generator=_gen(3)).tolist()
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
