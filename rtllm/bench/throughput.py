"""Offline throughput / latency benchmark of the engine, with transformers as the side-by-side baseline.

Requests are random-token prompts of ISL tokens generating exactly OSL tokens (EOS ignored), kept
at most ``concurrency`` in flight. The HF baseline runs the same prompts through
``model.generate`` in static batches of ``concurrency`` in the same process.
"""

from __future__ import annotations

import asyncio
import gc
import time

import torch

from rtllm.bench.workload import Workload, percentiles, run_event_loop
from rtllm.sampling_params import SamplingParams


def _summary(engine: str, wall: float, out_tokens: int, num_requests: int, **stats) -> dict:
    return {"engine": engine, "wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
            "request_s": num_requests / wall, **stats}


async def _run_one(llm, prompt, params, sem, rec) -> None:
    """One request, not streamed: the executor stamps each token as it arrives (``metrics.token_times``),
    so the client wakes once per request instead of once per token (a streaming consumer per request
    made this process, not the engine, the limit at high concurrency)."""
    async with sem:
        out = await llm.generate_async(prompt, params).aresult()
        m = out.metrics
        rec.append((m.arrival_time, list(m.token_times), len(out.outputs[0].token_ids)))


def bench_engine(llm, wl: Workload) -> dict:
    prompts = wl.prompts(llm.tokenizer.vocab_size, avoid=frozenset(llm.tokenizer.eos_token_ids))
    params = SamplingParams(max_tokens=wl.osl, min_tokens=wl.osl, temperature=0.0, ignore_eos=True)
    # warm-up at the workload's shapes, so one-time costs (Triton compiling a kernel variant for a new
    # shape class, the allocator growing) stay out of the measurement: a full wave of the workload's
    # concurrency, so that the big chunked prefills and mixed prefill+decode steps run once too
    # (measured on a fresh H100: 4 short warm-up requests left 10.9k-12.2k tok/s at ISL/OSL 128,
    # concurrency 256, against 14.5k once compiled). Distinct prompts keep the prefix cache out of it.
    warm = Workload(min(wl.concurrency, wl.num_requests), wl.isl, 4, wl.concurrency, seed=wl.seed + 1)
    # with the measured requests' sampling (greedy): a sampled warm-up left the greedy path's kernels
    # to compile in the first measured request (its TTFT 710 ms against 46 ms, fresh H100, batch 1)
    warm_params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(warm.prompts(llm.tokenizer.vocab_size), warm_params, use_tqdm=False)

    async def main() -> tuple[list, float]:
        sem = asyncio.Semaphore(wl.concurrency)
        rec: list = []
        t0 = time.perf_counter()
        await asyncio.gather(*(_run_one(llm, p, params, sem, rec) for p in prompts))
        return rec, time.perf_counter() - t0

    rec, wall = run_event_loop(main())
    ttft = [s[0] - t0 for t0, s, _ in rec if s]
    itl = [b - a for _, s, _ in rec for a, b in zip(s, s[1:])]
    tpot = [(s[-1] - s[0]) / (n - 1) for _, s, n in rec if n > 1]
    out_tokens = sum(n for _, _, n in rec)
    return _summary("rtllm", wall, out_tokens, len(rec), ttft_s=percentiles(ttft), tpot_s=percentiles(tpot),
                    itl_s=percentiles(itl))


def bench_hf(model_path: str, wl: Workload, dtype: torch.dtype, device: str, vocab_size: int,
             eos: frozenset[int]) -> dict:
    """transformers ``generate`` in static batches of ``concurrency`` (left-padded, equal ISL)."""
    import transformers as tf

    from rtllm.models.loader import find_gguf

    gguf = find_gguf(model_path)
    if model_path.endswith(".json"):  # random weights from a bare config, as the engine built them
        import json

        with open(model_path) as f:
            raw = json.load(f)
        cfg = tf.AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif gguf is not None:
        import os

        model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                        dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device).eval()
    prompts = wl.prompts(vocab_size, avoid=eos)
    ids = torch.tensor(prompts[:1], device=device)
    model.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    out_tokens = 0
    batch_times = []
    for i in range(0, len(prompts), wl.concurrency):
        ids = torch.tensor(prompts[i : i + wl.concurrency], device=device)
        tb = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=wl.osl,
                                 min_new_tokens=wl.osl, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        batch_times.append(time.perf_counter() - tb)
        out_tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    wall = time.perf_counter() - t0
    del model
    gc.collect()
    return _summary("transformers", wall, out_tokens, len(prompts),
                    tpot_s=percentiles([t / wl.osl for t in batch_times]))
