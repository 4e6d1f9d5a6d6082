"""FP8 KV-cache scales calibrated at load (QuantConfig.kv_cache_scales="calibrate"; the default is
"static", 1.0): k_scale / v_scale = the per-layer amax of the keys as cached (after RoPE) and of the values,
over the calibration text, / 448.

Oracle: transformers' own attention on the same checkpoint and sequences, its rotated keys and its
values captured where its rotary embedding returns them."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers.models.llama.modeling_llama as hf_llama
import transformers.models.qwen3.modeling_qwen3 as hf_qwen3

import rtllm.tokenizer  # noqa: F401  (registers the calibration tokenizer, as the LLM API does)
from rtllm.layers.attention import Attention
from rtllm.models.calibration import calibrate_kv_scales
from rtllm.models.loader import load_model
from rtllm.quantization.config import QuantConfig
from tests.tiny import make_checkpoint, ramp_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kvcal") / "llama")
    hf = make_checkpoint(path, "llama")
    return path, hf


def _hf_amax(hf, sequences, monkeypatch, hf_module=hf_llama):
    """Per layer: (amax |rotated k|, amax |v|) from transformers, fp32."""
    seen: list[tuple[float, float]] = []
    orig = hf_module.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *a, **kw):
        q_embed, k_embed = orig(q, k, cos, sin, *a, **kw)
        seen.append([float(k_embed.abs().max()), 0.0])
        return q_embed, k_embed

    monkeypatch.setattr(hf_module, "apply_rotary_pos_emb", capture)
    v_seen: list[float] = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: v_seen.append(float(o.abs().max())))
             for layer in hf.model.layers]
    n = len(hf.model.layers)
    out = [[0.0, 0.0] for _ in range(n)]
    with torch.no_grad():
        for s in sequences:
            seen.clear()
            v_seen.clear()
            hf(torch.tensor([s]))
            for i in range(n):
                out[i][0] = max(out[i][0], seen[i][0])
                out[i][1] = max(out[i][1], v_seen[i])
    for h in hooks:
        h.remove()
    return out


def test_scales_are_the_amax_of_rotated_keys_and_values(ckpt, monkeypatch):
    path, hf = ckpt
    model = load_model(path, "float32", "cpu").model
    sequences = ramp_prompts(3, seed=4, lo=20, hi=60)
    scales = calibrate_kv_scales(model, sequences)
    want = _hf_amax(hf, sequences, monkeypatch)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(scales) == len(layers) == len(want)
    for m, (k_amax, v_amax) in zip(layers, want):
        assert m.k_scale == pytest.approx(k_amax / 448, rel=1e-5)
        assert m.v_scale == pytest.approx(v_amax / 448, rel=1e-5)
        assert m.k_scale != 1.0 and m.v_scale != 1.0


def test_qwen3_scales_are_the_amax_of_normed_rotated_keys(tmp_path, monkeypatch):
    """Qwen3 caches its keys k-normed, then rotated (the attention layer applies the norms in its RoPE
    kernel): the calibration measures them so."""
    hf = make_checkpoint(str(tmp_path), "qwen3")
    model = load_model(str(tmp_path), "float32", "cpu").model
    sequences = ramp_prompts(2, seed=5, lo=20, hi=40)
    calibrate_kv_scales(model, sequences)
    want = _hf_amax(hf, sequences, monkeypatch, hf_qwen3)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == len(want)
    for m, (k_amax, v_amax) in zip(layers, want):
        assert m.k_scale == pytest.approx(k_amax / 448, rel=1e-5)
        assert m.v_scale == pytest.approx(v_amax / 448, rel=1e-5)


def test_load_calibrates_when_asked(ckpt):
    path, _ = ckpt
    cal = load_model(path, "float32", "cpu",
                     quant_config=QuantConfig(kv_cache_quant_algo="FP8", kv_cache_scales="calibrate")).model
    static = load_model(path, "float32", "cpu", quant_config=QuantConfig(kv_cache_quant_algo="FP8")).model
    assert all(m.k_scale != 1.0 for m in cal.modules() if isinstance(m, Attention))
    assert all(m.k_scale == 1.0 and m.v_scale == 1.0 for m in static.modules() if isinstance(m, Attention))
    with pytest.raises(Exception, match="kv_cache_scales='dynamic': must be one of"):
        QuantConfig(kv_cache_quant_algo="FP8", kv_cache_scales="dynamic")


def test_engine_dir_keeps_the_calibrated_scales(ckpt, tmp_path):
    from rtllm.builder import BuildConfig, build

    path, _ = ckpt
    qc = QuantConfig(kv_cache_quant_algo="FP8", kv_cache_scales="calibrate")
    out = build(path, BuildConfig(max_batch_size=8, max_num_tokens=64, dtype="float32", quant_config=qc),
                str(tmp_path / "eng"), device="cpu").output_dir
    with open(os.path.join(out, "config.json")) as f:
        stored = json.load(f)["kv_cache_scales"]
    at_load = load_model(path, "float32", "cpu", quant_config=qc).model
    want = {n: [m.k_scale, m.v_scale] for n, m in at_load.named_modules() if isinstance(m, Attention)}
    assert stored == want
    loaded = load_model(out).model
    assert {n: [m.k_scale, m.v_scale] for n, m in loaded.named_modules() if isinstance(m, Attention)} == want
