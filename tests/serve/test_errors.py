"""Bad input gets an OpenAI-style JSON error with the right status, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _post(server, path, body=None, headers=AUTH, content=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def _err(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"] or w == err["param"] or w == err["code"], (w, err)
    return err


@pytest.mark.parametrize("body,words", [
    ({"model": "tiny"}, ["messages", "Field required"]),
    ({"model": "tiny", "messages": []}, ["messages"]),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, ["messages.0.role"]),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, ["messages.0.content"]),
    ({"model": "tiny", "messages": "hello"}, ["messages"]),
    ({**OK_CHAT, "temperature": -1}, ["temperature", "greater than or equal to 0"]),
    ({**OK_CHAT, "temperature": "hot"}, ["temperature"]),
    ({**OK_CHAT, "max_tokens": 0}, ["max_tokens"]),
    ({**OK_CHAT, "max_tokens": "5"}, ["max_tokens"]),
    ({**OK_CHAT, "top_p": 0}, ["top_p"]),
    ({**OK_CHAT, "n": 0}, ["n"]),
    ({**OK_CHAT, "stop": 3}, ["stop"]),
    ({**OK_CHAT, "top_logprobs": 2}, ["top_logprobs requires logprobs"]),
    ({**OK_CHAT, "logit_bias": {"1": 5}}, ["logit_bias", "not supported"]),
    ({**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools", "not supported"]),
    ({**OK_CHAT, "response_format": {"type": "json_object"}}, ["response_format"]),
    ({**OK_CHAT, "temprature": 0.5}, ["temprature", "unknown parameter"]),
    ({**OK_CHAT, "max_tokens": 2, "max_completion_tokens": 3}, ["max_completion_tokens"]),
    ({**OK_CHAT, "min_tokens": 5}, ["min_tokens"]),
])
def test_bad_chat_bodies_are_400(server, body, words):
    _err(_post(server, "/v1/chat/completions", body), 400, *words)


def test_malformed_json_and_non_object(server):
    _err(_post(server, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
               headers={**AUTH, "Content-Type": "application/json"}), 400, "not valid JSON")
    _err(_post(server, "/v1/chat/completions", [1, 2]), 400, "JSON object")


def test_prompt_over_context_length(server):
    long = "x" * 300  # the byte tokenizer: 300 tokens > --max-seq-len 256
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": long, "max_tokens": 4}), 400,
         "context_length_exceeded", "maximum context length is 256")
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * 200, "max_tokens": 100}), 400,
         "context_length_exceeded", "max_tokens")
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": [10**9], "max_tokens": 4}), 400,
         "vocabulary")
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 4}), 400, "prompt")


def test_unknown_model_is_404(server):
    err = _err(_post(server, "/v1/chat/completions", {**OK_CHAT, "model": "gpt-9"}), 404, "model_not_found")
    assert "gpt-9" in err["message"]


def test_api_key_required_on_v1_routes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        _err(_post(server, "/v1/chat/completions", OK_CHAT, headers=headers), 401, "invalid_api_key")
        _err(httpx.get(server.url + "/v1/models", headers=headers), 401, "API key")
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_body_is_413(server):
    big = {**OK_CHAT, "messages": [{"role": "user", "content": "y" * 70000}]}
    _err(_post(server, "/v1/chat/completions", big), 413, "limit")


def test_unknown_route_and_method(server):
    _err(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    _err(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405)


def test_server_keeps_serving_after_errors(server):
    for _ in range(3):
        _post(server, "/v1/chat/completions", {"model": "tiny", "messages": []})
    r = _post(server, "/v1/chat/completions", OK_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
