"""Writers of pre-quantized checkpoints in the layouts users find on the hub, for the tests.

They follow the published layouts (AutoAWQ's ``WQLinear_GEMM`` packing, AutoGPTQ's
``QuantLinear.pack``, compressed-tensors / ModelOpt FP8 tensors) one value at a time, and return the
dequantized weights they wrote, from their own integers: nothing here calls rtllm's unpacking.
``unpack_bits`` is the bit-by-bit reader that checks the writers against the layout description.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from rtllm.quantization.hf_formats import AWQ_PACK_ORDER
from tests.tiny import write_byte_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_int32(x: torch.Tensor) -> torch.Tensor:
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
    return to_int32(out)


def pack_gptq_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qweight: [K, N] -> int32 [K * bits / 32, N]; value j of word i is row (32/bits) i + j."""
    per = 32 // bits
    K, N = vals.shape
    out = torch.zeros(K // per, N, dtype=torch.int64)
    for i in range(K // per):
        for j in range(per):
            out[i] |= vals[per * i + j].long() << (bits * j)
    return to_int32(out)


def pack_gptq_cols(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ qzeros: [G, N] -> int32 [G, N * bits / 32]; value j of word c is column (32/bits) c + j."""
    per = 32 // bits
    G, N = vals.shape
    out = torch.zeros(G, N // per, dtype=torch.int64)
    for c in range(N // per):
        for j in range(per):
            out[:, c] |= vals[:, per * c + j].long() << (bits * j)
    return to_int32(out)


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
    gen = seeded(7)
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
