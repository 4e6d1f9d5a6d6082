"""`rtllm bench serve`: a client-side benchmark of an OpenAI-compatible server (like `vllm bench serve`).

Sends ``--num-requests`` streaming /v1/completions requests, either at most ``--concurrency`` at
a time or arriving as a Poisson process at ``--request-rate`` per second. Prompts are random
token ids of ``--isl`` tokens (every id >= 100, distinct per request, so the prefix cache stays
out of the measurement) with ``ignore_eos`` so each request yields exactly ``--osl`` tokens, or
the lines of ``--prompts-file`` (text; the output length is then ``--osl`` at most).

Per request it records TTFT (send -> first content chunk), the gaps between chunks (ITL), TPOT
((e2e - TTFT) / (tokens - 1), tokens from the final usage chunk), e2e latency, and any error;
it prints request/s, output tok/s and p50/p90/p99 of each, and writes them as JSON.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from rtllm.bench.workload import Workload, percentiles, run_event_loop


@dataclass
class _Record:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, body: dict, headers: dict) -> _Record:
    rec = _Record()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"].get("message", "error event")
                    return rec
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - t0
                else:
                    rec.itl.append(now - last)
                last = now
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e = time.perf_counter() - t0
    rec.ok = rec.ttft is not None
    return rec


async def _prefix_hits(client: httpx.AsyncClient) -> float | None:
    """rtllm:prefix_cache_hits_total from the server's /metrics (None when it has none)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("rtllm:prefix_cache_hits_total"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _wait_ready(client: httpx.AsyncClient, timeout: float) -> None:
    """Poll /health until 200 (the engine may still be loading); raise SystemExit after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get("/health")
            if r.status_code == 200:
                return
            why = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise SystemExit(f"error: the server at {client.base_url} is not ready ({why})")
        await asyncio.sleep(0.5)


async def _run_records(base_url: str, model: str | None, prompts: list, osl: int, concurrency: int | None,
                       request_rate: float | None, api_key: str | None, ignore_eos: bool, seed: int,
                       ready_timeout: float) -> tuple[str, list[_Record], float, float]:
    """Send the prompts; (model name, one record per prompt, start and end time.perf_counter())."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=(concurrency or len(prompts)) + 8,
                          max_keepalive_connections=(concurrency or len(prompts)) + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(3600.0, connect=30.0),
                                 limits=limits) as client:
        await _wait_ready(client, ready_timeout)
        hits0 = await _prefix_hits(client)
        if model is None:
            r = await client.get("/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]

        def body(p) -> dict:
            return {"model": model, "prompt": p, "max_tokens": osl, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}

        sem = asyncio.Semaphore(concurrency) if concurrency else None
        rng = random.Random(seed)

        async def limited(p) -> _Record:
            if sem is None:
                return await _one(client, body(p), headers)
            async with sem:
                return await _one(client, body(p), headers)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        t1 = time.perf_counter()
        hits1 = await _prefix_hits(client)
    if hits0 is not None and hits1 is not None and hits1 > hits0:
        print(f"  note: the server's prefix cache served {hits1 - hits0:.0f} prompt tokens during this run "
              f"(repeated prompts: use a new --seed to measure uncached prefill)")
    return model, list(records), t0, t1


async def run_serve_bench(base_url: str, model: str | None, prompts: list, osl: int, concurrency: int | None,
                          request_rate: float | None, api_key: str | None, ignore_eos: bool = True,
                          seed: int = 0, ready_timeout: float = 0.0) -> dict:
    """The benchmark from one client process (one event loop)."""
    model, records, t0, t1 = await _run_records(base_url, model, prompts, osl, concurrency, request_rate, api_key,
                                                ignore_eos, seed, ready_timeout)
    return summarize(records, t1 - t0, model, base_url, concurrency, request_rate)


def _client_process(kw: dict) -> tuple[str, list[_Record], float, float]:
    return run_event_loop(_run_records(**kw))


def run_serve_bench_clients(num_clients: int, base_url: str, model: str | None, prompts: list, osl: int,
                            concurrency: int | None, request_rate: float | None, api_key: str | None,
                            ignore_eos: bool = True, seed: int = 0, ready_timeout: float = 0.0) -> dict:
    """The benchmark from ``num_clients`` processes: one Python event loop parses ~10k SSE events/s at
    most, which a fast server outruns. Prompts are dealt round-robin; each process gets its share of
    the concurrency (or of the Poisson rate: the union of independent Poisson streams is one with
    the summed rate). Wall time runs from the first start to the last end (perf_counter is
    system-wide)."""
    if num_clients <= 1:
        return run_event_loop(run_serve_bench(base_url, model, prompts, osl, concurrency, request_rate, api_key,
                                           ignore_eos, seed, ready_timeout))
    import concurrent.futures
    import multiprocessing

    n = min(num_clients, len(prompts), concurrency or num_clients)
    jobs = []
    for i in range(n):
        share = prompts[i::n]
        conc = None if concurrency is None else concurrency // n + (i < concurrency % n)
        jobs.append(dict(base_url=base_url, model=model, prompts=share, osl=osl, concurrency=conc,
                         request_rate=None if request_rate is None else request_rate / n, api_key=api_key,
                         ignore_eos=ignore_eos, seed=seed + i, ready_timeout=ready_timeout))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        results = list(pool.map(_client_process, jobs))
    records = [r for _, recs, _, _ in results for r in recs]
    wall = max(t1 for *_, t1 in results) - min(t0 for _, _, t0, _ in results)
    res = summarize(records, wall, results[0][0], base_url, concurrency, request_rate)
    res["num_clients"] = n
    return res


def summarize(records: list[_Record], wall: float, model: str, base_url: str, concurrency, request_rate) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "no tokens")[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "engine": "rtllm-serve", "base_url": base_url, "model": model, "concurrency": concurrency,
        "request_rate": request_rate, "num_requests": len(records), "completed": len(ok),
        "failed": len(records) - len(ok), "errors": errors, "wall_s": wall,
        "requests_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall, "output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in ok]), "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]), "e2e_s": percentiles([r.e2e for r in ok]),
    }


def add_serve_parser(bsub) -> None:
    p = bsub.add_parser("serve", help="client-side benchmark of a running OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--isl", type=int, default=128, help="random prompt tokens per request")
    p.add_argument("--osl", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument("--vocab-size", type=int, default=32000, help="random prompt ids are drawn below this")
    p.add_argument("--prompts-file", default=None, help="one text prompt per line instead of random tokens")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=None, help="requests in flight at most")
    g.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes sharing the load (one Python process parses ~10k streamed tokens/s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for GET /health to answer 200 before sending requests")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args) -> int:
    if args.prompts_file:
        with open(args.prompts_file) as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        if not lines:
            raise SystemExit(f"error: {args.prompts_file} has no prompts")
        prompts: list = [lines[i % len(lines)] for i in range(args.num_requests)]
    else:
        prompts = Workload(args.num_requests, args.isl, args.osl, args.concurrency or 0, args.seed).prompts(
            args.vocab_size)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 64
    if args.num_clients < 1:
        raise SystemExit(f"error: --num-clients={args.num_clients}: must be >= 1")
    res = run_serve_bench_clients(args.num_clients, args.base_url, args.model, prompts, args.osl, args.concurrency,
                                  args.request_rate, args.api_key, ignore_eos=not args.prompts_file,
                                  seed=args.seed, ready_timeout=args.ready_timeout)
    res.update(isl=None if args.prompts_file else args.isl, osl=args.osl)
    print_serve_summary(res)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["failed"] == 0 else 1


def print_serve_summary(res: dict) -> None:
    print(f"rtllm bench serve  {res['base_url']}  model={res['model']}  concurrency={res['concurrency']}  "
          f"rate={res['request_rate']}  clients={res.get('num_clients', 1)}")
    print(f"  completed {res['completed']}/{res['num_requests']} in {res['wall_s']:.2f} s  "
          f"({res['requests_per_s']:.2f} req/s, {res['output_tok_per_s']:.1f} output tok/s)")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = res[name]
        print(f"  {name[:-2].upper():5s} ms  p50 {p['p50'] * 1e3:9.2f}  p90 {p['p90'] * 1e3:9.2f}  "
              f"p99 {p['p99'] * 1e3:9.2f}  mean {p['mean'] * 1e3:9.2f}")
    for err, n in res["errors"].items():
        print(f"  error x{n}: {err}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="rtllm-bench-serve")
    sub = parser.add_subparsers(dest="mode", required=True)
    add_serve_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv if argv[:1] == ["serve"] else ["serve", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
