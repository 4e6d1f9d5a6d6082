"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end, against transformers
loading the same GGUF (dequantized) as the oracle."""

import pytest
import torch

from rtllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm():
    with LLM(dtype="float32", max_seq_len=512, max_batch_size=8) as llm:
        yield llm


def test_chat_answer_contains_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))
    assert "Paris" in out.outputs[0].text


def test_greedy_matches_transformers_on_the_same_gguf(llm, hf_default_model):
    hf = hf_default_model
    n = 24
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n, min_tokens=n, temperature=0), use_tqdm=False)
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, out.prompt
