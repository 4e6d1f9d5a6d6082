"""Greedy tokens of a tiny random checkpoint split across ranks vs one rank, on any device.

    python scripts/parallel_check.py [--device cuda] [--dtype float32] [--splits 2x1,1x2,2x2,2x1e2]
        [--archs llama,qwen3,mixtral,qwen3_moe]

Each split "TPxPP" (or "TPxPPeEP": MoE experts split EP ways) runs through
LLM(tensor_parallel_size=TP, pipeline_parallel_size=PP, moe_expert_parallel_size=EP) (one process
per rank; NCCL on CUDA, gloo on the CPU) and must give the one-rank run's token ids. Prints the time
of each run. Needs transformers (tests/tiny.py writes the checkpoints).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--splits", default="2x1,1x2")
    ap.add_argument("--archs", default="llama,qwen3")
    args = ap.parse_args()

    from rtllm import LLM, KvCacheConfig, SamplingParams
    from tests.tiny import make_checkpoint, ramp_prompts

    opts = dict(dtype=args.dtype, device=args.device, max_seq_len=512, max_num_tokens=64, max_batch_size=8,
                kv_cache_config=KvCacheConfig(max_tokens=4096, tokens_per_block=16))
    prompts = ramp_prompts(8, seed=1, lo=3, hi=90)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    failures = 0
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory() as path:
            make_checkpoint(path, arch, num_hidden_layers=4)
            t0 = time.perf_counter()
            with LLM(path, **opts) as llm:
                ref = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            print(f"{arch} 1x1: {time.perf_counter() - t0:.1f} s", flush=True)
            for split in args.splits.split(","):
                dims, _, ep = split.partition("e")
                tp, pp = (int(x) for x in dims.split("x"))
                if ep and "moe" not in arch and arch != "mixtral":
                    continue  # expert parallel splits only MoE models
                t0 = time.perf_counter()
                with LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                         moe_expert_parallel_size=int(ep) if ep else None, **opts) as llm:
                    out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
                same = sum(a == b for a, b in zip(out, ref))
                failures += same != len(ref)
                print(f"{arch} {split}: {time.perf_counter() - t0:.1f} s, {same}/{len(ref)} sequences equal to 1x1",
                      flush=True)
    print("OK" if not failures else f"FAILED: {failures} runs differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
