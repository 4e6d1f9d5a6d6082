"""`rtllm serve` with no model serves the embedded default (SmolLM2-135M-Instruct) through the
official openai client: the README's chat question gets its answer, and /v1/models names it."""

from __future__ import annotations

import pytest

from tests.serve.harness import ServerProc


@pytest.fixture(scope="module")
def default_server():
    s = ServerProc("--max-seq-len", "512", "--max-batch-size", "8")
    try:
        yield s.wait_ready(timeout=180)
    finally:
        s.close()


def test_default_model_chat_through_openai_client(default_server):
    import openai

    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    assert models == ["SmolLM2-135M-Instruct"]
    out = client.chat.completions.create(model=models[0], max_tokens=32, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    u = out.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 32
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
