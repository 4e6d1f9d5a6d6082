"""MoE in the benchmarks: the bound counts active parameters (k of E experts), checked on the
Qwen3-30B-A3B shape against its published sizes (30.5B parameters, 3.3B activated), and
`rtllm bench latency --random-weights` runs a shrunken Qwen3-MoE config on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rtllm.bench.bounds import Hardware, ModelCost, active_params, workload_bound

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def test_active_parameters_of_qwen3_30b_a3b():
    """The model built on the meta device (no memory): total and active sizes as Qwen publishes them."""
    from rtllm.layers.moe import expert_weight_bytes
    from rtllm.models.config import ModelConfig
    from rtllm.models.registry import get_model_class

    cfg = ModelConfig.from_file(os.path.join(CONFIGS, "qwen3-30b-a3b.json"))
    with torch.device("meta"):
        model = get_model_class(cfg.architectures)(cfg, max_positions=64)
    elt = model.lm_head.weight.element_size()
    total = sum(p.numel() for p in model.parameters()) * elt
    embed = model.model.embed_tokens.weight.numel() * elt
    experts = expert_weight_bytes(model)
    assert abs(total / elt / 30.5e9 - 1) < 0.01
    per_forward = total - embed  # the input embedding is a gather, not a read of the whole table
    active = active_params(per_forward // elt, experts // elt, cfg.num_experts, cfg.num_experts_per_tok)
    assert abs((active + embed / elt) / 3.3e9 - 1) < 0.03
    cost = ModelCost(per_forward, active, 0, 48, 32, 128, experts, 128, 8)
    assert cost.step_weight_bytes(1) == pytest.approx(active * elt)
    assert cost.step_weight_bytes(1) < 0.11 * per_forward  # about a tenth of the weights per batch-1 step
    assert cost.step_weight_bytes(4096) == pytest.approx(per_forward, rel=1e-6)  # a big batch hits every expert
    hw = Hardware("test", copy_bandwidth=3e12, matmul_flops=1e18)  # decode purely bandwidth bound
    b = workload_bound(cost, hw, num_requests=1, isl=1, osl=10, concurrency=1)
    assert b["decode_bound_s"] == pytest.approx(9 * cost.step_weight_bytes(1) / 3e12)  # the prefill samples the 1st


def test_dense_cost_is_unchanged():
    cost = ModelCost(1000, active_params(1000 // 2), 10, 2, 4, 16)
    assert cost.active_params == 500 and cost.step_weight_bytes(1) == cost.step_weight_bytes(64) == 1000


def test_bench_latency_random_weights_moe_config(tmp_path):
    """The shared Qwen3-30B-A3B config shrunk to tiny dims, given as a checkpoint directory."""
    with open(os.path.join(CONFIGS, "qwen3-30b-a3b.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, num_experts=8,
               num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "rtllm.cli", "bench", "latency", "--model", str(tmp_path),
                        "--random-weights", "--dtype", "float32", "--device", "cpu", "--isl", "12", "--osl", "5",
                        "--num-requests", "2", "--baseline", "hf", "--executor", "inprocess",
                        "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    moe = res["info"]["moe"]
    expert_bytes = 2 * 8 * 3 * 64 * 32 * 4  # layers x experts x (gate, up, down) x H x I x fp32
    # a token's multiply-adds, by hand: per layer q, k, v, o (64 x 64, 32, 32, 64), the router (8 x 64) and 2 of
    # the 8 experts (3 x 64 x 32 each); then the LM head (512 x 64). Norm weights are no matmul.
    per_layer = 64 * (64 + 32 + 32 + 64) + 8 * 64 + 2 * 3 * 64 * 32
    assert moe == {"expert_bytes": expert_bytes, "num_experts": 8, "experts_per_tok": 2,
                   "active_params": 2 * per_layer + 512 * 64}
    assert res["info"]["model"] == str(tmp_path / "config.json")
    assert res["rtllm"]["output_tokens"] == 2 * 5 and res["transformers"]["output_tokens"] == 2 * 5
    assert "2 of 8 experts per token" in p.stdout


def test_random_weights_needs_a_config(tmp_path):
    p = subprocess.run([sys.executable, "-m", "rtllm.cli", "bench", "latency", "--model", str(tmp_path),
                        "--random-weights"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--random-weights needs --model" in p.stdout + p.stderr


def test_prefill_bound_counts_the_lm_head_once_a_prompt():
    """Hand-checked: 1000 multiply-adds a token of which 400 are the LM head, a 10-token prompt: 600 x 10 +
    400 multiply-adds (x2 FLOPs) + causal attention 2 * 2 * 1 * 1 * 1 * 10^2 / 2 = 200 FLOPs, at 1 kFLOP/s."""
    cost = ModelCost(2000, 1000, 0, 1, 1, 1, head_params=400)
    hw = Hardware("test", copy_bandwidth=1e30, matmul_flops=1e3)
    b = workload_bound(cost, hw, num_requests=2, isl=10, osl=1, concurrency=2)
    assert b["bound_ttft_s"] == pytest.approx((2 * (600 * 10 + 400) + 200) / 1e3)
    assert b["prefill_bound_s"] == pytest.approx(2 * b["bound_ttft_s"])  # one wave of two prompts
