"""`rtllm bench serve` against the tiny server: every request completes with exactly OSL tokens, the
counts agree with the server's own metrics, and a bad key is reported as errors, not as speed."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.serve.conftest import API_KEY
from tests.serve.harness import metric


def _gen_tokens(server) -> float:
    return metric(httpx.get(server.url + "/metrics").text, "rtllm:generation_tokens_total")


def _bench(server, tmp_path, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rtllm.cli", "bench", "serve", "--base-url", server.url, "--num-requests", "12",
         "--isl", "16", "--osl", "8", "--vocab-size", "256", "--output-json", str(out), *extra],
        capture_output=True, text=True, timeout=240)
    res = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, res, proc.stdout + proc.stderr


def test_bench_serve_counts_match_the_server(server, tmp_path):
    before = _gen_tokens(server)
    rc, res, log = _bench(server, tmp_path, "--api-key", API_KEY, "--concurrency", "4")
    assert rc == 0, log
    assert res["completed"] == 12 and res["failed"] == 0 and res["model"] == "tiny"
    assert res["output_tokens"] == 12 * 8  # ignore_eos: every request runs to OSL
    assert _gen_tokens(server) - before == 12 * 8
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = res[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert res["ttft_s"]["p50"] <= res["e2e_s"]["p50"]
    assert res["output_tok_per_s"] > 0 and "output tok/s" in log


def test_bench_serve_from_two_client_processes(server, tmp_path):
    before = _gen_tokens(server)
    rc, res, log = _bench(server, tmp_path, "--api-key", API_KEY, "--concurrency", "4", "--num-clients", "2")
    assert rc == 0, log
    assert res["num_clients"] == 2 and res["completed"] == 12 and res["output_tokens"] == 12 * 8
    assert _gen_tokens(server) - before == 12 * 8
    assert "clients=2" in log


def test_bench_serve_with_request_rate(server, tmp_path):
    rc, res, log = _bench(server, tmp_path, "--api-key", API_KEY, "--request-rate", "50")
    assert rc == 0, log
    assert res["completed"] == 12 and res["request_rate"] == 50.0


def test_bench_serve_reports_errors(server, tmp_path):
    rc, res, log = _bench(server, tmp_path, "--api-key", "wrong", "--model", "tiny", "--concurrency", "4")
    assert rc == 1
    assert res["completed"] == 0 and res["failed"] == 12
    assert any("401" in e for e in res["errors"]), res["errors"]
