"""Pipeline micro-batches in flight vs one at a time: output tokens/s of a PP=2 engine (random weights).

    python scripts/pp_microbatch_bench.py [--device cpu] [--concurrency 16,32] [--micro 1,2] [--repeats 2]

A Llama of --hidden / --intermediate / --layers / --vocab (default 1024 / 2816 / 8 / 16000: 127M
parameters, 508 MB in fp32) built from a bare config (random weights), served by LLM(pipeline_parallel_size=
--pp, num_micro_batches=M) for each M; each run generates --concurrency requests of --isl random prompt
tokens and exactly --osl output tokens at once, after one warm-up request. Reports output tokens/s and
prompt + output tokens/s and the engine's steps/s (output tokens / concurrency / seconds). On the CPU
each rank gets cores / ranks threads, as the executor sets them. --tp1 adds the same model on one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load() -> str:
    """The 1-minute load average: other processes on the machine show up here (the ranks count too)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", default="1,2", help="micro-batches in flight to compare")
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, interleaved")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--tp1", action="store_true", help="also run the model on one rank")
    args = ap.parse_args()

    import torch

    from rtllm import LLM, KvCacheConfig, SamplingParams

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
           "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": 16,
           "num_key_value_heads": 8, "vocab_size": args.vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": args.dtype,
           "eos_token_id": 2}
    n_params = (args.layers * (args.hidden * (16 + 2 * 8) * (args.hidden // 16) + args.hidden * args.hidden
                               + 3 * args.hidden * args.intermediate) + 2 * args.vocab * args.hidden)
    print(f"model: {n_params / 1e6:.0f}M parameters, {n_params * 4 / 1e6:.0f} MB fp32; cores: {os.cpu_count()}; "
          f"torch {torch.__version__}", flush=True)
    concs = [int(c) for c in args.concurrency.split(",")]
    micros = [int(m) for m in args.micro.split(",")]
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.osl, min_tokens=args.osl, ignore_eos=True, temperature=0)
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        settings = [(f"pp{args.pp} micro {m}", dict(pipeline_parallel_size=args.pp, num_micro_batches=m))
                    for m in micros]
        if args.tp1:
            settings.append(("one rank", {}))
        for rep in range(args.repeats):
            for name, kw in settings:
                with LLM(path, dtype=args.dtype, device=args.device, max_batch_size=max(concs),
                         max_num_tokens=max(max(concs) * args.isl, 256), max_seq_len=args.isl + args.osl + 8,
                         kv_cache_config=KvCacheConfig(max_tokens=max(concs) * (args.isl + args.osl + 16)),
                         **kw) as llm:
                    llm.generate([torch.randint(3, args.vocab, (args.isl,), generator=g).tolist()],
                                 SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
                    for c in concs:
                        prompts = [torch.randint(3, args.vocab, (args.isl,), generator=g).tolist() for _ in range(c)]
                        t0 = time.perf_counter()
                        outs = llm.generate(prompts, params, use_tqdm=False)
                        secs = time.perf_counter() - t0
                        toks = sum(len(o.outputs[0].token_ids) for o in outs)
                        assert toks == c * args.osl
                        results.setdefault((name, c), []).append(toks / secs)
                        print(f"run {rep + 1}: {name:>14}, concurrency {c:3d}: {toks / secs:7.1f} output tok/s, "
                              f"{(toks + c * args.isl) / secs:7.1f} prompt+output tok/s, "
                              f"{toks / c / secs:5.2f} steps/s, {secs:6.2f} s (load average {_load()})", flush=True)
    print("\nbest of runs (output tokens/s):")
    for c in concs:
        base = max(results[(settings[0][0], c)])
        line = ", ".join(f"{name} {max(results[(name, c)]):.1f} ({max(results[(name, c)]) / base:.2f}x)"
                         for name, _ in settings)
        print(f"  concurrency {c}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
