"""Engine directories built for several ranks (`rtllm build --tp 2`): one weights file per rank, each
rank's slice quantized at build time; loading runs nothing of the quantization again.

Oracle: the same checkpoint split at load (TP=2, the same format), which quantizes each rank's
shards the same way: greedy tokens must be identical.
"""

import filecmp
import json
import os

import pytest

from rtllm import SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.errors import ConfigError
from rtllm.models.loader import load_model
from rtllm.parallel.mapping import Mapping
from rtllm.quantization import QuantConfig
from tests.parallel.harness import ENGINE, run_split
from tests.tiny import ramp_prompts

PROMPTS = ramp_prompts(4, seed=11, lo=5, hi=40)
ARRIVALS = [0, 0, 1, 3]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _build(ckpt, out, quant, **kw):
    bc = BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=512, max_input_len=256, dtype="float32",
                     tp_size=2, quant_config=quant, **kw)
    return build(ckpt, bc, str(out), device="cpu")


@pytest.mark.parametrize("quant", [None, QuantConfig("W8A16")], ids=["dense", "w8a16"])
def test_tp2_engine_equals_tp2_checkpoint(ckpt, tmp_path, quant):
    result = _build(ckpt, tmp_path / "eng", quant)
    files = sorted(f for f in os.listdir(result.output_dir) if f.endswith(".safetensors"))
    assert files == ["rank0.safetensors", "rank1.safetensors"]
    with open(os.path.join(result.output_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["tp_size"] == 2 and [r["weights"]["file"] for r in cfg["ranks"]] == files
    want, _ = run_split(ckpt, 2, 1, PROMPTS, GREEDY, ARRIVALS, quant_config=quant, **ENGINE)
    got, shapes = run_split(result.output_dir, 2, 1, PROMPTS, GREEDY, ARRIVALS, **ENGINE)
    assert got == want
    assert shapes[0] == shapes[1] and (130, 64) in shapes[0]  # each rank holds its half of the vocabulary


def test_tp2_engine_build_is_byte_identical_and_refuses_another_mapping(ckpt, tmp_path):
    a = _build(ckpt, tmp_path / "a", QuantConfig("W8A16")).output_dir
    b = _build(ckpt, tmp_path / "b", QuantConfig("W8A16")).output_dir
    for name in ("config.json", "rank0.safetensors", "rank1.safetensors"):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    with pytest.raises(ConfigError, match="built for tp_size=2, pp_size=1.*asks for tp_size=1"):
        load_model(a, device="cpu")
    with pytest.raises(ConfigError, match="built for tp_size=2, pp_size=1.*asks for tp_size=1, pp_size=2"):
        load_model(a, device="cpu", mapping=Mapping(2, 1, 2, rank=0))
