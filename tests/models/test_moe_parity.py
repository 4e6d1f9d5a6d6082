"""Mixtral and Qwen3-MoE against transformers (the oracle) on tiny random checkpoints: fp32 logits of a
batched prefill over prompts of different lengths, greedy tokens with inflight arrivals (engine
steps and the LLM API), and the checkpoint spellings of the experts."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtllm.models.forward import prefill_hidden
from rtllm.sampling_params import SamplingParams
from tests.tiny import hf_greedy, make_checkpoint, make_engine, ramp_prompts, run_engine

GREEDY = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)  # EOS masked, as HF min_new_tokens
MOE = {
    "mixtral": {},
    "qwen3_moe": {},
    # dense MLP in layer 1 (mlp_only_layers), top-k weights not renormalized, top-1 of 4 experts
    "qwen3_moe_mixed": dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False, num_experts=4,
                            num_experts_per_tok=1),
}


def checkpoint(path: str, case: str):
    return make_checkpoint(path, "mixtral" if case == "mixtral" else "qwen3_moe", **MOE[case])


def batched_prefill_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [model.compute_logits(h) for h in prefill_hidden(model, prompts)]


@pytest.mark.parametrize("case", list(MOE))
def test_logits_and_greedy_match_transformers(tmp_path, case):
    hf = checkpoint(str(tmp_path), case)
    engine = make_engine(str(tmp_path), max_num_tokens=64)
    model = engine.loaded.model
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == (["LlamaMLP" if i == 1 else "FusedMoE" for i in range(3)] if case == "qwen3_moe_mixed"
                     else ["FusedMoE"] * 2)
    prompts = ramp_prompts(5, seed=11, lo=2, hi=70)
    # every position's logits of one batched prefill (flat, ragged), against HF one prompt at a time
    for p, got in zip(prompts, batched_prefill_logits(model, prompts)):
        ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # greedy decode with requests arriving while others decode (chunked prefill under 64 tokens/step)
    ours = run_engine(engine, prompts, GREEDY, arrivals=[0, 0, 3, 7, 12])
    for p, o in zip(prompts, ours):
        assert o == hf_greedy(hf, p, GREEDY.max_tokens)


def test_llm_api_inflight_generate(tmp_path):
    """Through rtllm.LLM (engine thread in process): requests submitted while earlier ones run."""
    from rtllm import LLM, KvCacheConfig

    hf = checkpoint(str(tmp_path), "qwen3_moe")
    prompts = ramp_prompts(4, seed=12, lo=4, hi=40)

    async def staggered(llm):
        results = []
        for p in prompts:
            results.append(llm.generate_async(p, GREEDY))
            await asyncio.sleep(0.05)
        return [(await r.aresult()).outputs[0].token_ids for r in results]

    with LLM(str(tmp_path), dtype="float32", max_seq_len=128, max_num_tokens=64, max_batch_size=4,
             executor_type="inprocess", kv_cache_config=KvCacheConfig(max_tokens=1024, tokens_per_block=8)) as llm:
        outs = asyncio.run(staggered(llm))
    assert outs == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def _rewrite_weights(path, fn) -> None:
    """Rewrite model.safetensors through fn(dict of tensors) -> dict of tensors."""
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    save_file(fn(tensors), str(f), metadata={"format": "pt"})


def test_stacked_expert_names(tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) loads
    as well as the per-expert names save_pretrained writes."""
    hf = checkpoint(str(tmp_path), "mixtral")
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(".block_sparse_moe.experts.0.w1." in n for n in names)  # what save_pretrained wrote
    _rewrite_weights(tmp_path, lambda _: {k: v.contiguous() for k, v in hf.state_dict().items()})
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    engine = make_engine(str(tmp_path))
    p = ramp_prompts(1, seed=13)[0]
    got = batched_prefill_logits(engine.loaded.model, [p])[0]
    torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=1e-4, rtol=0)


def test_missing_or_misshapen_expert_is_an_error(tmp_path):
    from rtllm.errors import ModelLoadError
    from rtllm.models.loader import load_model

    checkpoint(str(tmp_path), "qwen3_moe")
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    orig = load_file(str(tmp_path / "model.safetensors"))
    _rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors.*layers\.1\.mlp\.w13"):
        load_model(str(tmp_path))
    _rewrite_weights(tmp_path, lambda t: {**orig, key: orig[key][:-1]})
    with pytest.raises(ModelLoadError, match=r"experts\.5\.up_proj.*shape mismatch"):
        load_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 9}))
    with pytest.raises(ModelLoadError, match="num_experts_per_tok=9"):
        load_model(str(tmp_path))


def test_engine_directory(tmp_path):
    """`rtllm build` stores the stacked experts and the router; the engine loads without the checkpoint."""
    from rtllm.builder import BuildConfig, build
    from rtllm.models.loader import load_model

    hf = checkpoint(str(tmp_path / "ckpt"), "qwen3_moe_mixed")
    build(str(tmp_path / "ckpt"), BuildConfig(), str(tmp_path / "engine"))
    model = load_model(str(tmp_path / "engine"), dtype="float32").model
    p = ramp_prompts(1, seed=14)[0]
    got = batched_prefill_logits(model, [p])[0]
    torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=1e-4, rtol=0)
