"""The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF) built into a W8A16 engine directory.

Oracle: LLM(default GGUF, same quant_config), which dequantizes the GGUF and quantizes at load. The
engine answers the same, loads from its own files (tokenizer exported from the GGUF metadata) and
starts much faster because nothing is dequantized or quantized again.
"""

from __future__ import annotations

import os

import pytest

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.llmapi.default_model import default_model_path
from rtllm.quantization.config import QuantConfig
from rtllm.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)


def _answer(model: str, quant: QuantConfig | None):
    with LLM(model, quant_config=quant, executor_type="inprocess", max_batch_size=8, max_num_tokens=512,
             max_seq_len=512, kv_cache_config=KvCacheConfig(max_tokens=2048)) as llm:
        out = llm.chat(QUESTION, PARAMS).outputs[0]
        return out.text, out.token_ids, llm.executor.engine_info["load_seconds"]


@pytest.mark.slow
def test_default_model_w8a16_engine(tmp_path):
    qc = QuantConfig("W8A16")
    out = str(tmp_path / "smollm2-w8a16")
    result = build(default_model_path(), BuildConfig(quant_config=qc, max_seq_len=2048), out, device="cpu")
    assert result.build_config.max_seq_len == 2048
    assert "tokenizer.json" in os.listdir(out) and "chat_template.jinja" in os.listdir(out)

    # the exported tokenizer is the GGUF's
    gguf_tok, eng_tok = Tokenizer.from_pretrained(default_model_path()), Tokenizer.from_pretrained(out)
    text = gguf_tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert eng_tok.apply_chat_template(QUESTION, add_generation_prompt=True) == text
    assert eng_tok.encode(text, add_special_tokens=False) == gguf_tok.encode(text, add_special_tokens=False)
    assert eng_tok.eos_token_ids == gguf_tok.eos_token_ids

    want_text, want_ids, quantize_s = _answer(default_model_path(), qc)
    got_text, got_ids, engine_s = _answer(out, None)
    assert "Paris" in got_text, got_text
    assert (got_text, got_ids) == (want_text, want_ids)
    # measured on the 2-core CPU: ~10 s (dequantize Q4_1 + quantize to int8) vs ~0.1 s
    assert engine_s * 3 < quantize_s, (engine_s, quantize_s)
