"""Perplexity of a model on held-out public-domain text (KJV, Gospel of John) for bf16 and each
weight quantization format, through rtllm.models directly (no serving engine).

    .venv/bin/python scripts/perplexity.py                         # default model, CPU, 512 tokens
    .venv/bin/python scripts/perplexity.py --device cuda --tokens 4096 --formats bf16,FP8,W4A16_AWQ

Prints one line per format (perplexity, change vs bf16, weight MiB, seconds) and, with --json,
one JSON object. The model is loaded once; each format quantizes a copy of it (W4A16_AWQ
calibrates on other KJV books first).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time

import torch

from rtllm.llmapi.default_model import default_model_path
from rtllm.models.forward import perplexity
from rtllm.models.loader import load_model, quantize_model
from rtllm.quantization.calib_data import evaluation_text
from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS, QuantConfig
from rtllm.tokenizer import load_tokenizer

# the targets on the default model (relative perplexity increase over bf16)
TARGETS = {"FP8": 0.01, "W8A16": 0.01, "W4A16_AWQ": 0.08}


def evaluate(model_path: str, formats: list[str], tokens: int, window: int, device: str, dtype: str,
             group_size: int | None = None, calib_size: int | None = None) -> dict[str, dict]:
    dense = load_model(model_path, dtype, device, max_positions=max(window, 512))
    encode = load_tokenizer(dense.tokenizer_source).encode
    ids = encode(evaluation_text())[:tokens]
    results: dict[str, dict] = {}
    for fmt in formats:
        t0 = time.perf_counter()
        if fmt.lower() in ("bf16", "none", "dense"):
            model, nbytes = dense.model, dense.weight_bytes
        else:
            kw = {} if calib_size is None else {"calib_size": calib_size}
            grouped = fmt.upper() in ("W4A16", "W4A16_AWQ")
            qc = QuantConfig(fmt, group_size if grouped else None, **kw)
            model = copy.deepcopy(dense.model)
            nbytes = quantize_model(model, qc, dense.tokenizer_source, encode)
        ppl = perplexity(model, ids, window)
        results[fmt] = {"perplexity": ppl, "weight_mib": nbytes / 2**20, "seconds": time.perf_counter() - t0}
        if model is not dense.model:
            del model
    base = results.get("bf16", {}).get("perplexity")
    for r in results.values():
        r["delta"] = None if base is None else r["perplexity"] / base - 1
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--formats", default="bf16," + ",".join(SUPPORTED_QUANT_ALGOS))
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    p.add_argument("--window", type=int, default=256, help="tokens per scored window")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group (default: 128 where it divides)")
    p.add_argument("--calib-size", type=int, default=None, help="W4A16_AWQ calibration sequences")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    res = evaluate(args.model or default_model_path(), args.formats.split(","), args.tokens, args.window,
                   args.device, args.dtype, args.group_size, args.calib_size)
    if args.json:
        print(json.dumps(res))
    else:
        for fmt, r in res.items():
            d = "" if r["delta"] is None else f"{100 * r['delta']:+.2f}%"
            tgt = TARGETS.get(fmt.upper())
            ok = "" if tgt is None or r["delta"] is None else ("  ok" if r["delta"] <= tgt else f"  OVER {tgt:.0%}")
            print(f"{fmt:>10}  ppl {r['perplexity']:8.3f}  {d:>8}  {r['weight_mib']:7.1f} MiB  "
                  f"{r['seconds']:6.1f} s{ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
