"""The INT8 embedding / LM head on a model shape, on the device it runs on (CUDA: the Triton W8A16 path).

    .venv/bin/python scripts/vocab_int8_check.py --device cuda                      # Llama-3.1-8B shape
    .venv/bin/python scripts/vocab_int8_check.py --model configs/llama-3.1-8b.json --formats none,W8A16,FP8

For each format: loads the config with random weights quantized at load, prints the weight bytes
(and their ratio to the dense model and to estimate_weight_bytes), checks the embedding lookup
against the dequantized rows (must be bit-equal) and the LM head's logits against ``F.linear`` with
the dequantized table (relative max error), and times the LM head at M = 1 against a bf16
``F.linear`` of the same shape (CUDA events, median of 50).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
import torch.nn.functional as F

from rtllm.layers.quant import Int8Embedding, W8A16Linear
from rtllm.layers.quantized_linear import estimate_weight_bytes
from rtllm.models.config import ModelConfig
from rtllm.models.loader import build_model, load_model
from rtllm.models.registry import get_model_class
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.int8 import dequantize_w8


def _time(fn, device: torch.device, reps: int = 50) -> float:
    if device.type != "cuda":
        return float("nan")
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/llama-3.1-8b.json")
    p.add_argument("--formats", default="none,FP8,W8A16,W4A16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = ModelConfig.from_file(args.model)
    meta = build_model(get_model_class(cfg.architectures), cfg, torch.bfloat16, torch.device("meta"), 16)
    dense_bytes = estimate_weight_bytes(meta, None)
    ok = True
    for fmt in args.formats.split(","):
        qc = QuantConfig.from_name(fmt)
        loaded = load_model(args.model, "bfloat16", device, max_positions=1024, quant_config=qc)
        model = loaded.model
        est = estimate_weight_bytes(meta, qc, device.type)
        line = (f"{fmt:>6}: {loaded.weight_bytes / 2**20:9.1f} MiB = {100 * loaded.weight_bytes / dense_bytes:5.1f}% "
                f"of bf16; estimate {'equal' if est == loaded.weight_bytes else f'{est / 2**20:.1f} MiB'}")
        emb, head = model.model.embed_tokens, model.lm_head
        if isinstance(emb, Int8Embedding) and isinstance(head, W8A16Linear):
            V = emb.num_embeddings
            ids = torch.randint(0, V, (300,), device=device)
            exact = torch.equal(emb(ids), dequantize_w8(emb.qweight[ids], emb.scales[ids], torch.bfloat16))
            errs = []
            for M in (1, 8, 64):
                x = torch.randn(M, head.in_features, device=device, dtype=torch.bfloat16)
                want = F.linear(x.float(), dequantize_w8(head.qweight, head.scales))
                errs.append(((head(x).float() - want).abs().max() / want.abs().max()).item())
            x1 = torch.randn(1, head.in_features, device=device, dtype=torch.bfloat16)
            w16 = torch.randn(head.out_features, head.in_features, device=device, dtype=torch.bfloat16)
            t_q = _time(lambda h=head, x=x1: h(x), device)
            t_d = _time(lambda x=x1, w=w16: F.linear(x, w), device)
            del w16
            ok &= exact and max(errs) < 1e-2
            line += (f"; lookup bit-equal: {exact}; LM head rel err M=1/8/64: "
                     f"{' / '.join(f'{e:.1e}' for e in errs)}; LM head M=1: {t_q:.1f} us int8 vs {t_d:.1f} us bf16")
        print(line, flush=True)
        del model, loaded, emb, head
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
