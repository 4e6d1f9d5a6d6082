"""GPU sampler check at Llama-3 vocabulary size: the Triton sampling kernel against the torch reference.

    python3 scripts/sampler_bench.py [--vocab 128256] [--json OUT.json]

For each batch size and parameter mix: how many rows pick a different token than the reference
given the same noise (ties aside, 0), and the time per call of the kernel, of the reference (full
sort for top-p), and of the whole Sampler.sample step (parameter upload + noise + kernel).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from rtllm.bench.bounds import time_cuda
from rtllm.kernels.sampling import sample_tokens_torch
from rtllm.kernels.triton_sampling import argmax_triton, sample_tokens_triton
from rtllm.runtime.sampler import Sampler, SamplingRow
from rtllm.sampling_params import SamplingParams

MIXES = {
    "T0.8/top_p0.9": dict(temperature=0.8, top_p=0.9),
    "T1/top_k50": dict(temperature=1.0, top_k=50),
    "T0.7/k40/p0.95/min_p0.05": dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05),
    "half greedy + T1/top_p0.95": None,
}


def _params(mix: str, b: int) -> list[SamplingParams]:
    if MIXES[mix] is None:
        return [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.0, top_p=0.95)
                for i in range(b)]
    return [SamplingParams(**MIXES[mix]) for _ in range(b)]


def _tensors(ps: list[SamplingParams], dev) -> tuple[torch.Tensor, ...]:
    return (torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k if p.top_k and p.top_k > 0 else 0 for p in ps], dtype=torch.int64, device=dev),
            torch.tensor([p.top_p for p in ps], dtype=torch.float64, device=dev),
            torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=dev))


def _time(fn, iters: int = 30) -> float:
    """Median ms per call."""
    return time_cuda(fn, iters) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sampler = Sampler()
    results = []
    print(f"{'mix':28s} {'B':>4s} {'mismatch':>9s} {'triton ms':>10s} {'torch ms':>9s} {'speedup':>8s} "
          f"{'Sampler.sample ms':>18s}")
    for b in [int(x) for x in args.batches.split(",")]:
        logits = (torch.randn(b, args.vocab, device=dev) * 3).to(torch.bfloat16)
        q = torch.empty(b, args.vocab, device=dev).exponential_()
        for mix in MIXES:
            ps = _params(mix, b)
            t, k, p, m = _tensors(ps, dev)
            got = sample_tokens_triton(logits, t, k, p, m, q)
            ref = sample_tokens_torch(logits, t, k, p, m, q, max_top_k=int(k.max()))
            mismatch = int((got != ref).sum())
            tt = _time(partial(sample_tokens_triton, logits, t, k, p, m, q))
            tr = _time(partial(sample_tokens_torch, logits, t, k, p, m, q, max_top_k=int(k.max())))
            rows = [SamplingRow(sp, None, [1, 2, 3], [], frozenset()) for sp in ps]
            ts = _time(partial(sampler.sample, logits, rows, to_cpu=False))
            print(f"{mix:28s} {b:4d} {mismatch:9d} {tt:10.3f} {tr:9.3f} {tr / tt:7.1f}x {ts:18.3f}")
            results.append(dict(mix=mix, batch=b, vocab=args.vocab, mismatched_rows=mismatch, triton_ms=tt,
                                torch_ms=tr, sampler_step_ms=ts))
    print(f"\n{'greedy argmax (fp32 logits)':28s} {'B':>4s} {'mismatch':>9s} {'split ms':>10s} {'torch ms':>9s}")
    for b in sorted({1, 8, 64, *[int(x) for x in args.batches.split(",")]}):
        logits = torch.randn(b, args.vocab, device=dev) * 3
        mismatch = int((argmax_triton(logits) != logits.argmax(dim=-1)).sum())
        tt = _time(partial(argmax_triton, logits))
        tr = _time(partial(torch.argmax, logits, dim=-1))
        print(f"{'':28s} {b:4d} {mismatch:9d} {tt:10.4f} {tr:9.4f}")
        results.append(dict(mix="greedy argmax", batch=b, vocab=args.vocab, mismatched_rows=mismatch,
                            triton_ms=tt, torch_ms=tr))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
