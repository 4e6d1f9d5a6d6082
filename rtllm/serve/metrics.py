"""Prometheus metrics of the server, named like vLLM's (``vllm:`` -> ``rtllm:``) where one exists.

Each server owns a private CollectorRegistry (tests run several apps in one process). Request
metrics are recorded when a request ends; the engine's gauges (running / waiting requests, KV
blocks, prefix-cache counters) are read from the executor at scrape time, so they are as fresh
as the engine's latest step.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector:
    """Gauges read from the engine when /metrics is scraped. ``snapshot()`` returns None while no
    engine is up, else a dict with num_running, num_waiting, kv_used_blocks, kv_total_blocks,
    prefix_queries, prefix_hits."""

    def __init__(self, snapshot: Callable[[], dict | None], model_name: str) -> None:
        self.snapshot = snapshot
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        s = self.snapshot() or {}
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        total = s.get("kv_total_blocks") or 0
        yield gauge("rtllm:num_requests_running", "Requests in the engine's running batch.", s.get("num_running", 0))
        yield gauge("rtllm:num_requests_waiting", "Requests queued in the engine, not yet scheduled.",
                    s.get("num_waiting", 0))
        yield gauge("rtllm:kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (1 = full).",
                    (s.get("kv_used_blocks", 0) / total) if total else 0.0)
        yield gauge("rtllm:num_kv_blocks_used", "KV cache blocks held by requests.", s.get("kv_used_blocks", 0))
        yield gauge("rtllm:num_kv_blocks_total", "KV cache blocks in the pool.", total)
        yield counter("rtllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.get("prefix_queries", 0))
        yield counter("rtllm:prefix_cache_hits", "Prompt tokens served by the prefix cache.", s.get("prefix_hits", 0))


class ServerMetrics:
    def __init__(self, model_name: str, engine_snapshot: Callable[[], dict | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter("rtllm:prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("rtllm:generation_tokens", "Tokens generated.", lab, registry=r)
        self.request_success = Counter("rtllm:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("rtllm:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("rtllm:time_per_output_token_seconds", "Mean time per output token after the first.",
                              lab, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("rtllm:e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("rtllm:request_queue_time_seconds",
                                    "Time a request waited in the engine before it was first scheduled.", lab,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("rtllm:request_prompt_tokens", "Prompt length of finished requests.", lab,
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram("rtllm:request_generation_tokens", "Generated tokens of finished requests.", lab,
                                 buckets=_TOKEN_BUCKETS, registry=r)
        self.http = Counter("rtllm:http_requests", "HTTP responses by route and status code.",
                            ["route", "status"], registry=r)
        self.rejected = Counter("rtllm:request_rejected", "Requests refused before reaching the engine, by reason.",
                                ["reason"], registry=r)
        r.register(_EngineCollector(engine_snapshot, model_name))

    def record_request(self, prompt_tokens: int, generated: int, finish_reasons: list[str], ttft: float | None,
                       tpot: float | None, e2e: float | None, queue_time: float | None) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generated)
        for reason in finish_reasons:
            self.request_success.labels(m, reason).inc()
        self.prompt_len.labels(m).observe(prompt_tokens)
        self.gen_len.labels(m).observe(generated)
        for hist, v in ((self.ttft, ttft), (self.tpot, tpot), (self.e2e, e2e), (self.queue_time, queue_time)):
            if v is not None:
                hist.labels(m).observe(v)

    def render(self) -> bytes:
        return generate_latest(self.registry)
