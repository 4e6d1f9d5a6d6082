"""Kernel tuning at build time on the GPU (skipped without CUDA): `rtllm build` on CUDA times the decode GEMVs
of every shape the model launches and stores the fastest; LLM(engine) on the same GPU uses them without
tuning, and gives the tokens of quantizing at load."""

import json
import os

import pytest
import torch

import rtllm.kernels.gemv_tuning as gemv_tuning
from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.builder.tuning import decode_gemv_shapes
from rtllm.kernels import triton_quant_gemv_config as gemv_cfg
from rtllm.models.engine_dir import TUNING_NAME
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig
from tests.tiny import make_checkpoint, ramp_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_build_on_the_gpu_tunes_every_decode_gemv_and_the_load_uses_them(tmp_path, monkeypatch):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "engine")
    make_checkpoint(ckpt, "llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512)
    qc = QuantConfig("W8A16")
    log = build(ckpt, BuildConfig(quant_config=qc, max_batch_size=8, max_num_tokens=256, max_seq_len=512,
                                  max_input_len=128), out, device="cuda").log
    with open(os.path.join(out, TUNING_NAME)) as f:
        tuning = json.load(f)
    shapes = decode_gemv_shapes(load_model(ckpt, "bfloat16", "cuda", quant_config=qc).model)
    assert tuning["gpu_name"] == torch.cuda.get_device_name()
    assert sorted((r["kind"], r["M"], r["N"], r["K"]) for r in tuning["gemv"]) == shapes
    assert log["kernel_tuning"]["tuned"] == len(shapes) and all(r["us"] > 0 for r in tuning["gemv"])

    monkeypatch.setattr(gemv_cfg, "TUNED", dict(gemv_cfg.TUNED))

    def boom(*a, **k):
        raise AssertionError("loading an engine directory must not tune kernels")

    monkeypatch.setattr(gemv_tuning, "tune", boom)
    # the engine first: its configurations then stay in this process's table (use_tuned), so the checkpoint
    # quantized at load runs the same kernels, and the tokens must be equal (the build round trip)
    prompts = ramp_prompts(4, seed=3, hi=60)
    greedy = SamplingParams(max_tokens=24, temperature=0)
    outs = []
    for model, quant in ((out, None), (ckpt, qc)):
        with LLM(model, quant_config=quant, device="cuda", executor_type="inprocess", max_batch_size=8,
                 kv_cache_config=KvCacheConfig(max_tokens=4096)) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
            if model == out:  # the in-process engine took the stored configurations into this process's table
                for r in tuning["gemv"]:
                    assert gemv_cfg.TUNED[(r["kind"], r["M"], r["N"], r["K"])].block_n == r["block_n"]
    assert outs[0] == outs[1]
