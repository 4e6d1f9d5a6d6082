"""Weights quantized at load, split across ranks (gloo, CPU): each rank quantizes its own shards.

Oracle: the same format at TP=1. Per output row (W8A16, FP8 weights) and per K-group (W4A16, groups
aligned with the shard boundary) the shards quantize exactly as the whole weight's rows / columns
do, so the only differences are where the row-parallel layers' partial products are summed and
rounded, and, for FP8, the per-token activation scale of a row-parallel layer's input slice. The
test compares the teacher-forced log-probabilities of the TP=1 greedy continuation.
"""

import pytest

from rtllm import SamplingParams
from rtllm.errors import ConfigError
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.quantization import QuantConfig
from tests.parallel.harness import ENGINE, run_split
from tests.tiny import make_engine, ramp_prompts, run_engine

PROMPTS = ramp_prompts(4, seed=7, lo=5, hi=40)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("algo", ["W8A16", "W4A16", "FP8"])
def test_quantized_tp2_matches_tp1(ckpt, algo):
    # the vocab-parallel embedding / LM head stay dense at tp=2: keep them dense at tp=1 too
    # and one INT4 group size for both (the default, the largest that divides K, differs between K and K/2)
    qc = QuantConfig(quant_algo=algo, exclude_modules=["embed_tokens", "lm_head"],
                     group_size=32 if algo == "W4A16" else None)
    ref = run_engine(make_engine(ckpt, quant_config=qc, **ENGINE), PROMPTS, GREEDY)
    out, _ = run_split(ckpt, 2, 1, PROMPTS, GREEDY, quant_config=qc, **ENGINE)
    same = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o))
    total = sum(len(r) for r in ref)
    # partial sums rounded per rank (bf16 outputs of the CPU int8 / fp8 paths) can flip a near-tie;
    # a split that lost its all-reduce or mis-sliced a shard produces unrelated tokens instead
    assert same >= 0.9 * total, (algo, ref, out)


def test_quantized_row_parallel_layers_reduce(ckpt):
    model = load_model(ckpt, dtype="float32", device="cpu", quant_config=QuantConfig(quant_algo="W8A16"),
                       mapping=Mapping(2, 2, 1, rank=1)).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {n.rsplit(".", 1)[1] for n, m in layers.items() if m.reduces_output} == {"o_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n, m in layers.items() if not m.reduces_output} == {"qkv_proj", "gate_up_proj"}


def test_awq_and_prequantized_split_are_refused(ckpt):
    with pytest.raises(ConfigError, match="W4A16_AWQ does not run with tp_size=2"):
        load_model(ckpt, dtype="float32", device="cpu", quant_config=QuantConfig(quant_algo="W4A16_AWQ"),
                   mapping=Mapping(2, 2, 1, rank=0))
