"""64 concurrent streaming clients, some disconnecting mid-stream: the rest get exactly the text they
get alone, no KV block stays held, and the metrics count every request sent."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.serve.conftest import API_KEY
from tests.serve.harness import metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _body(i: int, stream: bool, long: bool = False) -> dict:
    rng = random.Random(i)
    prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 12 if long else 90)))
    return {"model": "tiny", "prompt": prompt, "max_tokens": 240 if long else rng.randint(4, 48), "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def _stream(client: httpx.AsyncClient, i: int, disconnect_after: int | None) -> tuple[str, str | None]:
    text, reason, events = "", None, 0
    body = _body(i, True, long=disconnect_after is not None)
    async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            c = chunk["choices"][0]
            text += c["text"]
            reason = c["finish_reason"] or reason
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                return text, "disconnected"  # leaving the context manager closes the connection
    return text, reason


def test_concurrent_streams_with_disconnects(server):
    n, drop = 64, set(range(3, 64, 8))  # 8 clients disconnect after 2 chunks
    before = httpx.get(server.url + "/metrics").text
    ok_before = metric(before, "rtllm:request_success_total")

    async def run_all():
        limits = httpx.Limits(max_connections=n + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, i, 2 if i in drop else None) for i in range(n)))

    results = asyncio.run(run_all())
    # The dropped requests asked for 240 tokens; the others for at most 48 and are done. Had the
    # disconnects not aborted them, they would still be generating now.
    time.sleep(0.2)
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rtllm:num_requests_running") == 0, "disconnected requests are still running"
    assert metric(text, "rtllm:num_kv_blocks_used") == 0
    alone = {}
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
        for i in range(n):
            if i not in drop:
                r = c.post("/v1/completions", json=_body(i, False)).json()
                alone[i] = (r["choices"][0]["text"], r["choices"][0]["finish_reason"])
    for i, (text, reason) in enumerate(results):
        if i in drop:
            assert reason == "disconnected"
        else:
            assert (text, reason) == alone[i], i
            assert reason == "length"

    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "rtllm:num_kv_blocks_used") == 0
    assert metric(text, "rtllm:num_requests_running") == 0 and metric(text, "rtllm:num_requests_waiting") == 0
    sent = n + len(alone)
    assert metric(text, "rtllm:request_success_total") - ok_before == sent
    assert metric(text, "rtllm:request_success_total", finished_reason="abort") - \
        metric(before, "rtllm:request_success_total", finished_reason="abort") == len(drop)
