"""Mapping: rank layout as in TensorRT-LLM, and every rule checked at construction or against a model."""

import pytest

from rtllm.errors import ConfigError
from rtllm.models.config import ModelConfig
from rtllm.parallel.mapping import Mapping
from tests.tiny import hf_config


def model_config(arch="llama", **overrides) -> ModelConfig:
    return ModelConfig.from_dict({**hf_config(arch).to_dict(), "architectures": ["LlamaForCausalLM"], **overrides})


def test_defaults_are_one_rank():
    m = Mapping()
    assert (m.world_size, m.tp_size, m.pp_size, m.moe_tp_size, m.moe_ep_size, m.rank) == (1, 1, 1, 1, 1, 0)
    assert (m.tp_rank, m.pp_rank, m.tp_group, m.pp_group) == (0, 0, [0], [0])
    assert m.is_first_pp_rank() and m.is_last_pp_rank() and not m.has_tp() and not m.has_pp()


def test_rank_layout_tp_fastest():
    world = [Mapping(8, 4, 2, rank=r) for r in range(8)]
    assert [(m.tp_rank, m.pp_rank) for m in world] == [(r % 4, r // 4) for r in range(8)]
    m = world[6]
    assert m.tp_group == [4, 5, 6, 7] and m.pp_group == [2, 6]
    assert not m.is_first_pp_rank() and m.is_last_pp_rank()
    assert m.prev_pp_rank() == 2 and world[2].next_pp_rank() == 6
    assert world[0].tp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert world[0].pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # every rank is in exactly one tp group and one pp group
    assert sorted(r for g in world[0].tp_groups() for r in g) == list(range(8))
    assert sorted(r for g in world[0].pp_groups() for r in g) == list(range(8))


def test_moe_split_of_the_tp_group():
    m = Mapping(4, 4, 1, moe_tp_size=2, moe_ep_size=2, rank=3)
    assert (m.moe_tp_rank, m.moe_ep_rank) == (1, 1)
    assert m.moe_ep_group == [2, 3] and m.moe_tp_group == [1, 3]
    assert Mapping(4, 4, moe_ep_size=4).moe_tp_size == 1
    assert Mapping(4, 4, moe_tp_size=2).moe_ep_size == 2
    assert Mapping(2, 2) == Mapping(2, 2, 1, 2, 1, 0) and Mapping(2, 2).with_rank(1).rank == 1


def test_pp_layers_cover_every_layer_once():
    for layers, pp in [(2, 2), (5, 2), (7, 3), (32, 4)]:
        m = Mapping(pp, 1, pp)
        stages = [list(m.pp_layers_of(p, layers)) for p in range(pp)]
        assert [i for s in stages for i in s] == list(range(layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1
    assert list(Mapping(2, 1, 2, rank=1).pp_layers(5)) == [3, 4]


@pytest.mark.parametrize("kwargs, rule", [
    (dict(world_size=4, tp_size=2, pp_size=1), "tp_size * pp_size must equal world_size"),
    (dict(world_size=2, tp_size=2, pp_size=2), "tp_size * pp_size must equal world_size"),
    (dict(world_size=2, tp_size=2, rank=2), "rank"),
    (dict(world_size=2, tp_size=2, rank=-1), "rank"),
    (dict(world_size=0), "positive integer"),
    (dict(world_size=2, tp_size=2, moe_tp_size=2, moe_ep_size=2), "moe_tp_size * moe_ep_size must equal tp_size"),
    (dict(world_size=2, tp_size=2, moe_ep_size=3), "moe_tp_size * moe_ep_size must equal tp_size"),
])
def test_bad_mapping_fails_at_construction(kwargs, rule):
    with pytest.raises(ConfigError, match=rule.replace("*", r"\*")):
        Mapping(**kwargs)


def test_validate_for_model():
    Mapping(2, 2).validate_for(model_config(num_attention_heads=8, num_key_value_heads=2))
    Mapping(4, 4).validate_for(model_config(num_attention_heads=8, num_key_value_heads=2))  # KV heads replicated
    Mapping(8, 8).validate_for(model_config(num_attention_heads=8, num_key_value_heads=1, intermediate_size=128))
    with pytest.raises(ConfigError, match="num_attention_heads=8 must be divisible by tp_size") as e:
        Mapping(3, 3).validate_for(model_config(num_attention_heads=8, num_key_value_heads=8, intermediate_size=96))
    assert "tp_size=3" in str(e.value)
    with pytest.raises(ConfigError, match="num_key_value_heads=3 must be divisible by tp_size, or tp_size "
                                          "divisible by num_key_value_heads"):
        Mapping(2, 2).validate_for(model_config(num_attention_heads=6, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="num_hidden_layers=2 must be >= pp_size"):
        Mapping(4, 1, 4).validate_for(model_config())
    with pytest.raises(ConfigError, match="intermediate_size=100 must be divisible by tp_size"):
        Mapping(8, 8).validate_for(model_config(num_attention_heads=8, intermediate_size=100))


def test_validate_for_experts():
    moe = model_config(architectures=["MixtralForCausalLM"], model_type="mixtral", num_attention_heads=8,
                       num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2)
    Mapping(2, 2, moe_ep_size=2).validate_for(moe)
    Mapping(4, 4, moe_ep_size=4).validate_for(moe)
    with pytest.raises(ConfigError, match="moe_ep_size=8 does not fit .*num_experts=4 must be divisible by "
                                          "moe_ep_size"):
        Mapping(8, 8, moe_ep_size=8).validate_for(moe)  # more expert ranks than experts
    with pytest.raises(ConfigError, match="num_experts=0 must be divisible by moe_ep_size"):
        Mapping(2, 2, moe_ep_size=2).validate_for(model_config())  # a dense model has no experts to split
