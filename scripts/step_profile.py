"""Where one engine step goes on the GPU, for a dense or quantized model at a throughput-sized batch.

    python scripts/step_profile.py --model configs/llama-3.1-8b.json --quant fp8 --kv-cache-dtype fp8 \
        --decode-batch 512 --context 192 --prefill-tokens 8192 --prefill-isl 128

Random weights from a bare config, in-process executor. Prints, per engine:
- the decode CUDA graph of ``--decode-batch`` sequences, each reading ``--context`` cached tokens
  from its own blocks (distinct blocks, so the KV reads are what a real step reads; the graph
  includes the LM head): replay time (median of 20) and per-kernel GPU time by category;
- a prefill step of ``--prefill-tokens`` new tokens as prompts of ``--prefill-isl`` tokens through
  ModelRunner.execute (the LM head of each prompt's last token included, sampling not): wall time
  and per-kernel GPU time by category.
Full per-kernel tables go to --out. Compare engines of one run (``--quant`` / ``--kv-cache-dtype``
accept comma-separated lists, run in order, paired by position).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

import torch
from kernel_profile import kernel_table
from torch.profiler import ProfilerActivity, profile

from rtllm.bench.bounds import time_cuda


def timed(fn, n: int) -> float:
    """Median ms of ``n`` calls of ``fn``, by CUDA events."""
    return time_cuda(fn, n) * 1e3


def run_engine(quant: str, kv: str, args) -> None:
    from rtllm import LLM, SamplingParams
    from rtllm.config import CudaGraphConfig
    from rtllm.quantization.config import QuantConfig
    from rtllm.runtime.request import Request
    from rtllm.runtime.scheduler import ScheduledBatch

    label = f"{quant}_kv-{kv}"
    qc = QuantConfig.from_name(quant, None, kv)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype="bfloat16", device="cuda", executor_type="inprocess", quant_config=qc,
              cuda_graph_config=CudaGraphConfig(batch_sizes=[args.decode_batch]),
              max_batch_size=args.decode_batch, max_num_tokens=args.prefill_tokens,
              max_seq_len=max(args.context, args.prefill_isl) + 64 + args.generate)
    print(f"\n=== weights {quant}, KV cache {kv}: engine ready in {time.perf_counter() - t0:.1f} s")
    try:
        runner = llm.executor.engine.runner
        bs = runner.block_size
        vocab = llm.tokenizer.vocab_size
        rng = random.Random(0)
        with torch.inference_mode():
            graphs = runner.graphs
            B, ctx = args.decode_batch, args.context
            nb = -(-(ctx + 1) // bs)
            g = graphs.graphs[B]
            graphs.seq_lens[:B].fill_(ctx + 1)
            graphs.positions[:B].fill_(ctx)
            graphs.slot_mapping[:B].fill_(-1)  # no cache writes: replays leave the pool as it is
            graphs.block_tables[:B, :nb].copy_(
                1 + torch.arange(B * nb, dtype=torch.int32, device="cuda").view(B, nb))
            ms = timed(g.replay, 20)
            print(f"decode step, batch {B}, context {ctx} (graph replay, LM head included): {ms:.3f} ms "
                  f"= {B / ms * 1e3:,.0f} tok/s")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    g.replay()
                torch.cuda.synchronize()
            kernel_table(prof, 5, os.path.join(args.out, f"decode_{label}.txt"), f"decode step, batch {B} ({label})")

            n = args.prefill_tokens // args.prefill_isl
            npb = -(-args.prefill_isl // bs)
            one = SamplingParams(max_tokens=1, temperature=0.0)

            def prefill():
                reqs = []
                for i in range(n):
                    r = Request(f"p{i}", [rng.randrange(100, min(vocab, 30000)) for _ in range(args.prefill_isl)],
                                one, frozenset(), 1)
                    r.block_ids = list(range(1 + i * npb, 1 + (i + 1) * npb))
                    reqs.append(r)
                runner.execute(ScheduledBatch(reqs, [args.prefill_isl] * n))

            prefill()
            torch.cuda.synchronize()
            ms = timed(prefill, 5)
            print(f"prefill step, {n} prompts x {args.prefill_isl} tokens: {ms:.2f} ms "
                  f"= {n * args.prefill_isl / ms * 1e3:,.0f} tok/s (host included)")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    prefill()
                torch.cuda.synchronize()
            kernel_table(prof, 3, os.path.join(args.out, f"prefill_{label}.txt"),
                         f"prefill {n} x {args.prefill_isl} ({label})")
            if args.generate:
                generation_gaps(llm, rng, vocab, args)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def generation_gaps(llm, rng, vocab: int, args) -> None:
    """One request generating --generate tokens through the engine (batch 1), under the profiler:
    TPOT, the GPU's busy time per step (kernels, merged where they overlap) and its idle time, and
    the kernels that run outside the decode graph (those the graph-only table does not have)."""
    from torch.autograd import DeviceType

    from rtllm import SamplingParams

    n = args.generate
    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
    prompt = [rng.randrange(100, min(vocab, 30000)) for _ in range(args.context)]
    llm.generate(prompt, params, use_tqdm=False)  # warm
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        out = llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
    tpot = out.metrics.time_per_output_token * 1e3
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, idle, cur_s, cur_e = 0.0, [], None, None
    for st, en, _ in spans:
        if cur_e is None or st > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                idle.append(st - cur_e)
            cur_s, cur_e = st, en
        else:
            cur_e = max(cur_e, en)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    idle.sort(reverse=True)
    print(f"generation of {n} tokens at batch 1: TPOT {tpot:.3f} ms; GPU busy {busy / n / 1e3:.3f} ms a step, "
          f"idle {(wall - busy) / n / 1e3:.3f} ms a step over {wall / 1e3:.1f} ms (largest gaps, us: "
          f"{', '.join(f'{g:.0f}' for g in idle[:8])})")
    counts: dict[str, list[float]] = {}
    for st, en, name in spans:
        counts.setdefault(name, []).append(en - st)
    per_step = sorted(((sum(v) / n, len(v) / n, k) for k, v in counts.items()), reverse=True)
    print("   kernels per step, us (count per step):")
    for us, c, k in per_step[:25]:
        print(f"   {us:9.1f} x{c:<5.1f} {k[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="configs/llama-3.1-8b.json")
    ap.add_argument("--quant", default="none,fp8,fp8")
    ap.add_argument("--kv-cache-dtype", default="auto,auto,fp8")
    ap.add_argument("--decode-batch", type=int, default=512)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--prefill-isl", type=int, default=128)
    ap.add_argument("--generate", type=int, default=0,
                    help="also profile one request generating this many tokens (batch 1): GPU idle per step")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/step-profile"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    quants, kvs = args.quant.split(","), args.kv_cache_dtype.split(",")
    if len(quants) != len(kvs):
        ap.error("--quant and --kv-cache-dtype need as many entries")
    for q, kv in zip(quants, kvs):
        run_engine(q, kv, args)


if __name__ == "__main__":
    main()
