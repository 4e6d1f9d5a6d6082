"""Tune and time the weight-only decode kernels at Llama-3.1-8B shapes on the GPU.

    python3 scripts/quant_kernel_tune.py [--out DIR] [--m 1,2,4] [--jobs 12]
    python3 scripts/quant_kernel_tune.py --smoke      # CPU, TRITON_INTERPRET=1: every path runs once

For each shape (N x K), weight format (W4A16 group 128, INT8, FP8 weight-only, and w16: the dense bf16
weight, also at the Qwen3-30B-A3B attention shapes) and M: bf16 F.linear, the kernel used before the
GEMV kernels (the M = 1 W4 GEMV of before, the tensor-core kernels otherwise; F.linear for w16) and a
small grid of GEMV configurations (block_n, block_k, num_warps, prefetch, split-K) of
rtllm.kernels.triton_quant_gemv. Time: median of CUDA-graph replays of launches that rotate over enough
weight copies (>= 128 MiB) that L2 never holds the weight; bandwidth = weight bytes read (codes + scales
+ zeros) / time, as a share of a device-to-device copy measured in the same run. The best GEMV
configuration is checked against the fp32 reference (relative error printed) and written to
DIR/gemv_tuned.json, which RTLLM_QUANT_GEMV_CONFIG=that file makes the engine use (the table in
triton_quant_gemv_config.TUNED holds the committed results).
All configurations are compiled first by --jobs processes in parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's rtllm
from rtllm.kernels.gemv_tuning import (  # noqa: E402
    gemv_fn,
    grid,
    random_weights,
    reference,
    rel_err,
    time_launches,
    tune,
    weight_bytes,
)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
W8_EXTRA = {"lm_head": (128256, 4096)}  # the INT8 LM head (W8 only)
W16_EXTRA = {"moe_qkv": (5120, 2048), "moe_o": (2048, 4096)}  # Qwen3-30B-A3B's dense projections (w16 only)
GROUP = 128


def _compile_job(job: tuple) -> str:
    """Compile one (kind, M, config, split) by launching it once on a small problem."""
    import torch

    from rtllm.kernels.triton_quant_gemv import GemvConfig, w4_gemv, w8_gemv, w16_gemv

    kind, M, (bn, bk, warps, pf, tc, stages), split = job
    dev = torch.device("cuda")
    K = 1024
    N = bn * 2
    x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
    cfg = GemvConfig(bn, bk, split, warps, pf, tc, stages)
    try:
        if kind == "w4":
            qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
            s = torch.rand(K // GROUP, N, dtype=torch.bfloat16, device=dev)
            w4_gemv(x, qw, s, s, cfg)
        elif kind == "w16":
            w16_gemv(x, torch.randn(N, K, dtype=torch.bfloat16, device=dev), cfg)
        else:
            q = torch.randint(-127, 127, (N, K), dtype=torch.int8, device=dev)
            if kind == "fp8":
                q = q.view(torch.float8_e4m3fn)
            w8_gemv(x, q, torch.rand(N, device=dev), cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # out of resources for this tile: reported, skipped in the timing
        return f"{job}: {type(e).__name__}: {str(e)[:200]}"


def copy_bw() -> float:
    import torch

    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / time_launches([lambda: b.copy_(a)], 10)


def _gated_check(fn, x, w: tuple, cfg) -> str:
    """The fused SiLU-and-mul epilogue against the GEMV then the activation kernel (bit for bit)."""
    from rtllm.kernels.triton_activation import silu_and_mul_triton

    same = bool((fn(x, *w, config=cfg, silu_and_mul=True) == silu_and_mul_triton(fn(x, *w, config=cfg))).all())
    return " | silu fused == unfused" if same else " | !! silu fused != unfused"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--m", default="1,2,4")
    ap.add_argument("--kinds", default="w4,w8,fp8")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--verbose", action="store_true", help="print every configuration's time")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter: run each path once on a small shape")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    import multiprocessing as mp

    import torch

    from rtllm.kernels.triton_attention.common import sm_count
    from rtllm.kernels.triton_quant_gemm import w4_gemv_triton, w4a16_gemm_triton, w8a16_gemm_triton

    dev = torch.device("cuda")
    ms = [int(m) for m in args.m.split(",")]
    kinds = args.kinds.split(",")
    sms = sm_count(torch.empty(1, device=dev))
    jobs = []
    for kind in kinds:
        for M in ms:
            for c in grid(kind, M):
                jobs += [(kind, M, c, 1), (kind, M, c, 2)]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        errors = [e for e in pool.map(_compile_job, jobs) if e]
    for e in errors:
        print("compile:", e)
    bw = copy_bw()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    tuned, rows = [], []
    for kind in kinds:
        shapes = dict(SHAPES, **(W8_EXTRA if kind == "w8" else W16_EXTRA if kind == "w16" else {}))
        for name, (N, K) in shapes.items():
            nbytes = weight_bytes(kind, N, K)
            copies = max(2, math.ceil(128 * 2**20 / nbytes))
            ws = random_weights("bf16" if kind == "w16" else kind, N, K, copies, dev)
            dense = random_weights("bf16", N, K, max(2, math.ceil(128 * 2**20 / (N * K * 2))), dev)
            for M in ms:
                x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
                t_bf16 = time_launches([partial(torch.nn.functional.linear, x, *d) for d in dense])
                if kind == "w4":
                    old = w4_gemv_triton if M == 1 else w4a16_gemm_triton
                    t_old = time_launches([partial(old, x, *w) for w in ws])
                elif kind == "w16":
                    t_old = t_bf16
                else:
                    t_old = time_launches([partial(w8a16_gemm_triton, x, *w) for w in ws])
                best = tune(f"w4g{GROUP}" if kind == "w4" else kind, M, N, K, dev)
                for line in best.failed if best else ():  # did not run, or a wrong product: never chosen
                    print(f"  !! {kind} {name} M={M} {line}")
                if best is None:
                    continue
                if args.verbose:
                    for c, t, r in best.timed:
                        print(f"  {kind} {name} M={M} {c.key():16s} {t * 1e6:6.1f} us rel err {r:.1e}")
                t_new, cfg, rel = best.seconds, best.config, best.rel_err
                gated = _gated_check(gemv_fn(kind), x, ws[0], cfg) if name == "gate_up" else ""
                tuned.append(best.row())
                row = (f"{kind:4s} {name:8s} M={M} | bf16 {t_bf16 * 1e6:6.1f} us ({N * K * 2 / t_bf16 / bw:4.0%}) | "
                       f"before {t_old * 1e6:6.1f} us ({nbytes / t_old / bw:4.0%}) | GEMV {t_new * 1e6:6.1f} us "
                       f"({nbytes / t_new / bw:4.0%}) {cfg.key()} | {t_old / t_new:4.2f}x before, "
                       f"{t_bf16 / t_new:4.2f}x bf16 | rel err {rel:.1e}{gated}")
                rows.append(row)
                print(row, flush=True)
            del ws, dense
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_tuned.json"), "w") as f:
        json.dump(tuned, f, indent=1)
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; % = weight bytes / time / copy bandwidth")
    print("\n".join(rows))


def smoke() -> None:
    """Run every kernel path once on the CPU interpreter (no timing)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from rtllm.kernels.triton_quant_gemv import GemvConfig, w4_gemv, w8_gemv, w16_gemv

    K, N = 256, 64
    for M in (1, 2):
        x = torch.randn(M, K).to(torch.bfloat16)
        w4 = random_weights("w4", N, K, 1, "cpu")[0]
        for cfg in (GemvConfig(32, 32, 2, 4), GemvConfig(64, 128, 2, 4, tc=True)):
            print("w4", cfg.key(), M, rel_err(w4_gemv(x, *w4, config=cfg), reference("w4", x, w4)))
        for kind in ("w8", "fp8"):
            w = random_weights(kind, N, K, 1, "cpu")[0]
            print(kind, M, rel_err(w8_gemv(x, *w, config=GemvConfig(16, 64, 2, 4)), reference(kind, x, w)))
        w = random_weights("bf16", N, K, 1, "cpu")[0]
        print("w16", M, rel_err(w16_gemv(x, *w, config=GemvConfig(16, 64, 2, 4)), reference("w16", x, w)))


if __name__ == "__main__":
    main()
