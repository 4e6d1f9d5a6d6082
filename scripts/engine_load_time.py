"""Start-up time of an engine directory against quantizing at load, on the default model (or --model).

For each format: build the engine once, then time (a) load_model(checkpoint, quant_config) and
load_model(engine_dir), best of --repeat, and (b) LLM construction to the first generated token
(in-process executor) for both. Prints one table; --json for machine-readable rows.

    python scripts/engine_load_time.py --quant none w8a16 w4a16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def main() -> None:
    from rtllm import LLM, KvCacheConfig, SamplingParams
    from rtllm.builder import BuildConfig, build
    from rtllm.llmapi.default_model import default_model_path
    from rtllm.models.loader import load_model
    from rtllm.quantization.config import QuantConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quant", nargs="+", default=["none", "w8a16", "w4a16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model or default_model_path()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.quant:
            qc = QuantConfig.from_name(name)
            out = os.path.join(tmp, name)
            t0 = time.perf_counter()
            build(model, BuildConfig(quant_config=qc, max_seq_len=2048, max_batch_size=64, max_num_tokens=2048),
                  out, device=device)
            build_s = time.perf_counter() - t0

            def best(fn) -> float:
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    fn()
                    if device.startswith("cuda"):  # loading and quantizing launch kernels asynchronously
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                return min(times)

            load_ckpt = best(lambda: load_model(model, device=device, max_positions=2048, quant_config=qc))  # noqa: B023
            load_eng = best(lambda: load_model(out, device=device))  # noqa: B023

            def first_token(path: str, quant) -> tuple[float, list[list[int]]]:
                """(seconds from LLM() to the first generated token, greedy tokens of two prompts)."""
                t = time.perf_counter()
                with LLM(path, quant_config=quant, device=device, executor_type="inprocess", max_seq_len=2048,
                         max_batch_size=64, max_num_tokens=2048, kv_cache_config=KvCacheConfig(max_tokens=4096)) as llm:
                    llm.generate([1, 2, 3], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
                    secs = time.perf_counter() - t
                    outs = llm.generate([[10, 20, 30, 40], [7] * 50], SamplingParams(max_tokens=16, temperature=0),
                                        use_tqdm=False)
                    return secs, [o.outputs[0].token_ids for o in outs]

            ckpt_s, ckpt_tokens = first_token(model, qc)
            eng_s, eng_tokens = first_token(out, None)
            row = {"quant": name, "device": device, "build_s": build_s, "load_model_checkpoint_s": load_ckpt,
                   "load_model_engine_s": load_eng, "speedup": load_ckpt / load_eng,
                   "llm_first_token_checkpoint_s": ckpt_s, "llm_first_token_engine_s": eng_s,
                   "same_greedy_tokens": ckpt_tokens == eng_tokens,
                   "engine_mib": os.path.getsize(os.path.join(out, "rank0.safetensors")) / 2**20}
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"model {model} on {device} (best of {args.repeat})")
    print(f"{'quant':8} {'build s':>8} {'load ckpt s':>12} {'load engine s':>14} {'speedup':>8} "
          f"{'LLM->1st tok ckpt s':>20} {'LLM->1st tok engine s':>22} {'engine MiB':>10} same tokens")
    for r in rows:
        print(f"{r['quant']:8} {r['build_s']:8.2f} {r['load_model_checkpoint_s']:12.2f} "
              f"{r['load_model_engine_s']:14.3f} "
              f"{r['speedup']:7.0f}x {r['llm_first_token_checkpoint_s']:20.2f} {r['llm_first_token_engine_s']:22.2f} "
              f"{r['engine_mib']:10.1f} {r['same_greedy_tokens']}")


if __name__ == "__main__":
    main()
