"""Expected weight memory of a model per quantization format, from its config alone (meta device, no weights).

    .venv/bin/python scripts/weight_memory.py                                # configs/llama-3.1-8b.json
    .venv/bin/python scripts/weight_memory.py --model configs/llama-3.1-8b.json --exclude lm_head,embed_tokens

Builds the rtllm model on the meta device (fused q|k|v and gate|up, as the engine holds it) and counts
the bytes each format's layers would hold (rtllm.layers.quantized_linear.estimate_weight_bytes: the
same group choices, exclusions and tied-table rule as quantizing; tests check it against real
quantized models). Prints MiB and the ratio to the dense (model dtype) weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from rtllm.layers.quantized_linear import estimate_weight_bytes
from rtllm.models.config import ModelConfig
from rtllm.models.loader import build_model
from rtllm.models.registry import get_model_class
from rtllm.quantization.config import SUPPORTED_QUANT_ALGOS, QuantConfig


def table(config_path: str, formats: list[str], group_size: int | None, dtype: torch.dtype,
          exclude: list[str] | None, device_type: str) -> dict[str, dict]:
    cfg = ModelConfig.from_file(config_path)
    model = build_model(get_model_class(cfg.architectures), cfg, dtype, torch.device("meta"), max_positions=16)
    dense = estimate_weight_bytes(model, None)
    out = {}
    for fmt in formats:
        if fmt.lower() in ("bf16", "dense", "none"):
            qc = None
        else:
            grouped = fmt.upper() in ("W4A16", "W4A16_AWQ")
            qc = QuantConfig(fmt, group_size if grouped else None, exclude_modules=exclude)
        b = estimate_weight_bytes(model, qc, device_type)
        out[fmt] = {"bytes": b, "mib": b / 2**20, "ratio": b / dense}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/llama-3.1-8b.json", help="a config.json")
    p.add_argument("--formats", default="bf16," + ",".join(SUPPORTED_QUANT_ALGOS))
    p.add_argument("--group-size", type=int, default=None, help="INT4 group (default: 128 where it divides)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--exclude", default="", help="comma-separated QuantConfig.exclude_modules patterns")
    p.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"], help="whose layouts (CPU INT4 "
                   "needs out_features % 16 == 0)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = table(args.model, args.formats.split(","), args.group_size, getattr(torch, args.dtype),
                [e for e in args.exclude.split(",") if e] or None, args.device_type)
    if args.json:
        print(json.dumps(res))
    else:
        for fmt, r in res.items():
            print(f"{fmt:>10}  {r['mib']:9.1f} MiB  {100 * r['ratio']:5.1f}% of {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
