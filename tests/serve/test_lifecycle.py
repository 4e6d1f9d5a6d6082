"""Admission control, a killed engine worker, restart, and graceful shutdown under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.serve.harness import ServerProc, metric

LONG = {"model": "tiny", "prompt": "abc", "max_tokens": 240, "temperature": 0, "ignore_eos": True}


def _start(tiny_dir, *extra, max_seq_len: int = 256):
    return ServerProc(tiny_dir, "--dtype", "float32", "--max-seq-len", str(max_seq_len), "--served-model-name",
                      "tiny", *extra).wait_ready()


async def _consume(client: httpx.AsyncClient, body: dict) -> dict:
    """Stream one request; return its status, the text, the finish reason, any error event, and [DONE]."""
    out = {"status": None, "text": "", "finish": None, "error": None, "done": False}
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = json.loads(await r.aread())["error"]
                out["retry_after"] = r.headers.get("retry-after")
                return out
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = chunk["error"]
                    else:
                        out["text"] += chunk["choices"][0]["text"]
                        out["finish"] = chunk["choices"][0]["finish_reason"] or out["finish"]
    except httpx.HTTPError as e:
        out["error"] = {"transport": repr(e)}
    return out


def _run(url: str, bodies: list[dict]) -> list[dict]:
    """Stream every body concurrently."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(_consume(client, b) for b in bodies))
    return asyncio.run(main())


def test_queue_bound_gives_429_with_retry_after(tiny_dir):
    s = _start(tiny_dir, "--max-batch-size", "2", "--max-queue", "1")
    try:
        outs = _run(s.url, [{**LONG, "prompt": f"req {i}"} for i in range(6)])
        rejected = [o for o in outs if o["status"] == 429]
        served = [o for o in outs if o["status"] == 200]
        assert len(served) == 3 and len(rejected) == 3  # 2 running + 1 queued
        assert all(o["retry_after"] and o["error"]["type"] == "rate_limit_error" for o in rejected)
        assert all(o["finish"] == "length" and o["done"] for o in served)
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "max_tokens": 2})  # capacity is back
        assert r.status_code == 200
        assert metric(httpx.get(s.url + "/metrics").text, "rtllm:request_rejected_total", reason="queue_full") == 3
    finally:
        s.close()


def _kill_worker_mid_run(s: ServerProc):
    (pid,) = s.worker_pids()
    results = {}

    def client():
        results["outs"] = _run(s.url, [LONG] * 4)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while metric(httpx.get(s.url + "/metrics").text, "rtllm:num_requests_running") < 4:
        assert time.monotonic() < deadline, "requests never started"
        time.sleep(0.05)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "clients hung after the worker was killed"
    elapsed = time.monotonic() - t0
    return results["outs"], elapsed


def test_killed_worker_fails_inflight_and_server_exits(tiny_dir):
    s = _start(tiny_dir, "--max-batch-size", "8", "--shutdown-timeout", "5")
    try:
        outs, elapsed = _kill_worker_mid_run(s)
        assert elapsed < 10
        for o in outs:
            assert o["status"] == 200 and o["error"] is not None and o["done"], o
            assert "engine" in o["error"]["message"] and o["error"]["type"] == "server_error"
        # /health turns 503 (the server is going down); then the process exits 1 for its supervisor
        code = s.proc.wait(30)
        assert code == 1
        assert "the engine died" in s.logs()
    finally:
        s.close()


def test_killed_worker_is_restarted_when_configured(tiny_dir):
    s = _start(tiny_dir, "--max-batch-size", "8", "--on-engine-death", "restart")
    try:
        old = s.worker_pids()
        outs, _ = _kill_worker_mid_run(s)
        assert all(o["error"] is not None for o in outs)
        deadline = time.monotonic() + 60
        saw_503 = False
        while True:
            r = httpx.get(s.url + "/health")
            saw_503 |= r.status_code == 503
            if r.status_code == 200 and saw_503:
                break
            assert time.monotonic() < deadline, \
                f"the engine did not come back ({r.status_code} {r.text}):\n{s.logs()[-3000:]}"
            time.sleep(0.05)
        assert s.worker_pids() and s.worker_pids() != old
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        s.close()


@pytest.mark.parametrize("timeout_s", [0.5])
def test_sigterm_while_streaming_exits_zero(tiny_dir, timeout_s):
    s = _start(tiny_dir, "--max-batch-size", "8", "--shutdown-timeout", str(timeout_s), max_seq_len=1024)
    try:
        short = {**LONG, "max_tokens": 8}
        very_long = {**LONG, "max_tokens": 1000, "prompt": "x"}  # outlasts the shutdown timeout
        results = {}

        def client():
            results["outs"] = _run(s.url, [short] * 3 + [very_long] * 3)

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(s.url + "/metrics").text, "rtllm:num_requests_running") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(timeout_s + 20)
        took = time.monotonic() - t0
        t.join(30)
        assert code == 0, s.logs()
        assert took < timeout_s + 15
        outs = results["outs"]
        for o in outs:  # each client got its final chunk, or a clean error event followed by [DONE]
            assert o["done"], o
        assert all(o["finish"] == "length" and o["error"] is None for o in outs[:3])
        assert all(o["finish"] is None and "shutting down" in o["error"]["message"] for o in outs[3:]), outs[3:]
    finally:
        s.close()
