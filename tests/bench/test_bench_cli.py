"""`rtllm bench throughput` on a bare-config model (random weights) on the CPU: the JSON it writes
agrees with the workload it was given, a concurrency sweep runs each point on one engine, and
--plot writes a PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tests.tiny import hf_config

    cfg = hf_config("llama").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtllm.cli", "bench", *args], capture_output=True, text=True,
                          timeout=240)


def test_throughput_sweep_json_and_plot(tiny_config, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "sweep.png"
    p = _bench("throughput", "--model", tiny_config, "--dtype", "float32", "--num-requests", "12", "--isl", "16",
               "--osl", "6", "--concurrency", "4,2", "--plot", str(png), "--output-json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert [r["concurrency"] for r in res["sweep"]] == [2, 4]  # sorted, the last is the workload's
    for r in res["sweep"]:
        assert r["output_tokens"] == 12 * 6  # ignore_eos + min_tokens: every request runs to OSL
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"]
    assert res["rtllm"] == res["sweep"][-1] | {"peak_gpu_memory_bytes": 0}
    # the engine's max_seq_len (it sizes the decode graphs' attention splits), ISL + OSL + 8 by default
    assert res["info"]["max_seq_len"] == 16 + 6 + 8 and "max_seq_len 30" in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "concurrency sweep" in p.stdout
    # on the CPU the bound comes from this CPU's own copy and GEMM rates, measured in the run
    hw = res["info"]["hardware"]
    assert hw["copy_bandwidth"] > 1e8 and hw["matmul_flops"] > 1e8 and "threads)" in hw["name"]
    assert res["rtllm"]["ratio_to_bound"] > 0 and "bound:" in p.stdout


def test_bad_concurrency_and_plot_without_a_sweep(tiny_config, tmp_path):
    p = _bench("throughput", "--model", tiny_config, "--concurrency", "0")
    assert p.returncode != 0 and "concurrencies must be >= 1" in p.stderr
    p = _bench("throughput", "--model", tiny_config, "--concurrency", "4", "--plot", str(tmp_path / "x.png"))
    assert p.returncode != 0 and "needs a --concurrency list" in (p.stdout + p.stderr)


def test_commit_names_this_checkout_or_the_override(monkeypatch):
    """The JSON's commit: RTLLM_COMMIT for an exported tree, else this checkout's HEAD (an export nested
    in another repository must not report that repository's HEAD)."""
    import subprocess
    from pathlib import Path

    from rtllm.bench.cli import _commit

    monkeypatch.setenv("RTLLM_COMMIT", "abc1234")
    assert _commit() == "abc1234"
    monkeypatch.delenv("RTLLM_COMMIT")
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    assert _commit() == head


def test_rounds_alternate_engine_and_baseline(tiny_config, tmp_path):
    """--rounds N: N fresh engines each followed by the baseline; every round's ratio is its own figures'
    ratio, the printed median is theirs, and the top-level figures are the last round's."""
    import statistics

    out = tmp_path / "r.json"
    p = _bench("throughput", "--model", tiny_config, "--dtype", "float32", "--num-requests", "4", "--isl", "8",
               "--osl", "4", "--concurrency", "2", "--baseline", "hf", "--rounds", "2", "--output-json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    rounds = res["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert r["rtllm_output_tok_s"] > 0 and r["transformers_output_tok_s"] > 0
        assert r["ratio_vs_hf"] == pytest.approx(r["rtllm_output_tok_s"] / r["transformers_output_tok_s"])
        assert r["kv_capacity_tokens"] == res["info"]["kv_capacity_tokens"] > 0  # the baseline left no less
    assert rounds[-1]["rtllm_output_tok_s"] == res["rtllm"]["output_tok_s"]
    assert rounds[-1]["ratio_vs_hf"] == res["ratio_vs_hf"]
    median = statistics.median(r["ratio_vs_hf"] for r in rounds)
    assert "median of 2 rounds" in p.stdout and f"ratio {median:.2f}x" in p.stdout.splitlines()[-1]
    p = _bench("throughput", "--model", tiny_config, "--rounds", "0")
    assert p.returncode != 0 and "'0': must be >= 1" in p.stderr
