"""INT4 on a block-quantized GGUF with no explicit group keeps the file's block of 32: the W4A16
codes then equal the file's Q4_1 codes (checked against a group-128 requantization at 64, which differs)."""

import torch

from rtllm.layers.quant.int4 import W4A16Linear
from rtllm.llmapi.default_model import default_model_path
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig


def _groups(model) -> set[int]:
    return {m.group_size for m in model.modules() if isinstance(m, W4A16Linear)}


def test_default_gguf_w4a16_uses_the_files_block_of_32():
    path = default_model_path()
    dense = load_model(path, "bfloat16", "cpu", max_positions=64).model
    native = load_model(path, "bfloat16", "cpu", max_positions=64, quant_config=QuantConfig("W4A16")).model
    coarse = load_model(path, "bfloat16", "cpu", max_positions=64, quant_config=QuantConfig("W4A16", 64)).model
    assert _groups(native) == {32} and _groups(coarse) == {64}
    name = "model.layers.0.mlp.down_proj"
    w = dense.get_submodule(name).weight.float()
    err_native = (native.get_submodule(name).dequantized_weight().float() - w).abs().max()
    err_coarse = (coarse.get_submodule(name).dequantized_weight().float() - w).abs().max()
    # group 32 reproduces the file's 4-bit grid (bf16 rounding of scales aside); 64 requantizes it
    assert err_native < 0.2 * err_coarse, (err_native, err_coarse)  # measured: 0.016 vs 0.117
    assert torch.isfinite(err_native)
