"""The multiply-adds a FLOP bound counts (engine_info's linear_params / expert_params), against a hand count
from the checkpoint's config: the same for a model whose weights are stored in 4 bits, where weight bytes
divided by the element size would count a quarter of them."""

from __future__ import annotations

import pytest

from rtllm.quantization.config import QuantConfig
from tests.tiny import hf_config, make_checkpoint, make_engine


def _attention(c) -> int:
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h = c.hidden_size
    return h * c.num_attention_heads * d * 2 + h * c.num_key_value_heads * d * 2  # q, o; k, v


@pytest.mark.parametrize("quant", [None, "W4A16"])
def test_dense_linear_params_are_the_logical_weights(tmp_path, quant):
    make_checkpoint(str(tmp_path), "llama")
    c = hf_config("llama")
    per_layer = _attention(c) + 3 * c.hidden_size * c.intermediate_size
    qc = QuantConfig(quant, group_size=32) if quant else None
    info = make_engine(str(tmp_path), dtype="float32", quant_config=qc).info()
    assert info["linear_params"] == c.num_hidden_layers * per_layer
    assert info["expert_params"] == 0
    assert info["lm_head_params"] == c.vocab_size * c.hidden_size
    if quant:  # stored in 4 bits: bytes / 4 (fp32) would count about an eighth of the layers' weights
        assert info["weight_bytes"] / 4 < 0.5 * (info["linear_params"] + 2 * info["lm_head_params"])


def test_moe_linear_params_count_every_expert_and_the_router(tmp_path):
    make_checkpoint(str(tmp_path), "mixtral")
    c = hf_config("mixtral")
    experts = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    info = make_engine(str(tmp_path), dtype="float32").info()
    assert info["expert_params"] == c.num_hidden_layers * experts
    assert info["linear_params"] == c.num_hidden_layers * (
        _attention(c) + experts + c.num_local_experts * c.hidden_size)


def test_lm_head_params_are_this_ranks(tmp_path):
    """Counted as linear_params counts the decoder: per rank (a tensor-parallel head's vocabulary shard,
    none on a pipeline stage without it), in the logical shape of a quantized head."""
    from rtllm.layers.moe import linear_params
    from rtllm.models.loader import load_model
    from rtllm.parallel.mapping import Mapping
    from rtllm.runtime.engine_info import _lm_head_params

    make_checkpoint(str(tmp_path), "llama")
    c = hf_config("llama")
    full = c.vocab_size * c.hidden_size
    assert make_engine(str(tmp_path), dtype="float32", quant_config=QuantConfig("W4A16", group_size=32)
                       ).info()["lm_head_params"] == full  # an INT8 head, counted in its logical shape
    for mapping, head in ((Mapping(2, 2, 1, rank=1), full // 2), (Mapping(2, 1, 2, rank=0), 0)):
        model = load_model(str(tmp_path), dtype="float32", device="cpu", mapping=mapping).model
        assert _lm_head_params(model) == head
        assert linear_params(model.model)[0] == c.num_hidden_layers * (
            _attention(c) + 3 * c.hidden_size * c.intermediate_size) // 2  # half the layers' width, or half the layers
