"""The OpenAI API through the official `openai` client against `rtllm serve` (tiny fp32 model)."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.serve.conftest import API_KEY

MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            delta = getattr(c, "delta", None)
            piece = (delta.content if delta is not None else c.text) or ""
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                assert c.index not in reasons, "two finish chunks for one choice"
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "rtllm"


def test_chat_greedy_matches_offline_engine(client, tiny_dir):
    from rtllm import LLM, SamplingParams

    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    with LLM(tiny_dir, dtype="float32", executor_type="inprocess", max_seq_len=256) as llm:
        want = llm.chat(MSG, SamplingParams(max_tokens=12, temperature=0))
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == want.outputs[0].text
    assert c.finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.model == "tiny" and r.object == "chat.completion"


def test_stream_deltas_join_to_non_stream_text_same_seed(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    full = client.chat.completions.create(**kw)
    texts, reasons, chunks = _stream_text(client.chat.completions.create(stream=True, **kw))
    assert texts[0] == full.choices[0].message.content
    assert reasons[0] == full.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk


def test_stream_usage_chunk(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    _, _, chunks = _stream_text(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                               **kw))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_n2_sampled_choices(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1]
    texts, reasons, _ = _stream_text(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16,
                                                                    temperature=1.0, n=2, seed=1, stream=True))
    assert texts == {c.index: c.message.content for c in r.choices}
    assert set(reasons) == {0, 1}
    assert r.choices[0].message.content != r.choices[1].message.content  # different seeds per sample


def test_completion_prompt_forms_and_echo(client, tiny_dir):
    from rtllm.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(tiny_dir).encode("abc")
    a = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0)
    b = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    multi = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in sorted(multi.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by = {c.index: c.text for c in multi.choices}
    assert by[0] == by[1] == a.choices[0].text  # greedy: both samples of prompt 0 agree
    e = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, echo=True)
    assert e.choices[0].text == "abc" + a.choices[0].text


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[3:5]
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop, "@@@@"],
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.text == base[: base.index(stop)]
    texts, reasons, _ = _stream_text(client.completions.create(model="tiny", prompt="hello", max_tokens=30,
                                                               temperature=0, stop=stop, stream=True,
                                                               extra_body={"ignore_eos": True}))
    assert texts[0] == c.text and reasons[0] == "stop"


def test_chat_logprobs(client, tiny_dir):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3
        lps = [t.logprob for t in tok.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert tok.logprob == pytest.approx(lps[0])  # greedy picks the top token
        assert tok.token == tok.top_logprobs[0].token
        assert sum(math.exp(x) for x in lps) <= 1.0 + 1e-5
    texts, _, chunks = _stream_text(client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])


def test_completion_logprobs_shape(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_max_completion_tokens_and_length_finish(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_health_version_metrics_open_without_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/version").json()["version"]
    text = httpx.get(server.url + "/metrics").text
    for name in ("rtllm:num_requests_running", "rtllm:num_requests_waiting", "rtllm:prompt_tokens_total",
                 "rtllm:generation_tokens_total", "rtllm:time_to_first_token_seconds_bucket",
                 "rtllm:time_per_output_token_seconds_bucket", "rtllm:e2e_request_latency_seconds_bucket",
                 "rtllm:request_queue_time_seconds_bucket", "rtllm:kv_cache_usage_perc",
                 "rtllm:prefix_cache_hits_total", "rtllm:request_success_total", "rtllm:http_requests_total"):
        assert name in text, name


def test_request_id_header_and_auth_header_forms(server):
    h = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "my-req-1"}
    r = httpx.post(server.url + "/v1/completions", headers=h, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-1" and r.json()["id"] == "my-req-1"
