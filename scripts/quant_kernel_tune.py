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
import statistics
import sys
from functools import partial

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
W8_EXTRA = {"lm_head": (128256, 4096)}  # the INT8 LM head (W8 only)
W16_EXTRA = {"moe_qkv": (5120, 2048), "moe_o": (2048, 4096)}  # Qwen3-30B-A3B's dense projections (w16 only)
GROUP = 128

# (block_n, block_k, num_warps, prefetch, tc, stages); CUDA cores: the per-thread columns are block_n /
# (32 num_warps); tc: the W4 tensor-core kernel (block_n rows of m64 MMAs, block_k = the group, stages
# K tiles in flight)
W4_TC = [(64, 128, 4, False, True, 4), (128, 128, 4, False, True, 3), (128, 128, 4, False, True, 5),
         (128, 64, 4, False, True, 6), (256, 128, 4, False, True, 3), (256, 128, 8, False, True, 4)]
W4_CUDA = [(512, 32, 4, True, False, 3), (1024, 32, 4, True, False, 3), (1024, 32, 8, True, False, 3),
           (512, 64, 4, False, False, 3), (1024, 32, 4, False, False, 3)]
W4_GRID = W4_CUDA + W4_TC
W4_GRID_M = W4_CUDA[:3] + W4_TC  # M > 1
W8_GRID = [(32, 256, 4, True, False, 3), (16, 512, 4, True, False, 3), (64, 256, 8, True, False, 3),
           (32, 512, 8, True, False, 3), (32, 256, 4, False, False, 3), (16, 256, 4, True, False, 3)]
# fewer rows, longer rows (what won for the dense 16-bit GEMV: 8 rows x 1 KiB); fp8 at M = 1 only
FP8_GRID = W8_GRID + [(8, 1024, 4, True, False, 3), (16, 1024, 4, True, False, 3), (8, 512, 4, True, False, 3),
                      (4, 1024, 4, True, False, 3), (16, 1024, 8, True, False, 3), (8, 2048, 8, True, False, 3)]
W8_GRID_M = [(32, 256, 4, True, False, 3), (16, 256, 4, True, False, 3)]
# w16: block_k in bf16 elements (the W8 loop, two bytes a weight)
W16_GRID = [(16, 256, 4, True, False, 3), (32, 128, 4, True, False, 3), (16, 128, 4, True, False, 3),
            (32, 256, 8, True, False, 3), (64, 128, 8, True, False, 3), (8, 512, 4, True, False, 3),
            (16, 256, 4, False, False, 3), (32, 128, 4, False, False, 3), (8, 1024, 4, True, False, 3),
            (4, 1024, 4, True, False, 3), (8, 1024, 8, True, False, 3), (16, 512, 8, True, False, 3),
            (4, 512, 4, True, False, 3)]
W16_GRID_M = [(16, 256, 4, True, False, 3), (32, 128, 4, True, False, 3), (16, 128, 4, True, False, 3)]
SPLITS = (1, 2, 4, 8, 16, 32)


def _splits(n_tiles: int, k_units: int, sms: int, waves: int = 5) -> list[int]:
    """Split counts giving between ~0.7 and ~``waves`` waves of programs (always at least one)."""
    out = [s for s in SPLITS if s <= k_units and 0.7 * sms <= n_tiles * s <= waves * sms]
    if not out:
        out = [min((s for s in SPLITS if s <= k_units), key=lambda s: abs(n_tiles * s - 2 * sms))]
    return out


def _grid(kind: str, M: int) -> list[tuple[int, int, int, bool, bool, int]]:
    if kind == "w4":
        return W4_GRID if M == 1 else W4_GRID_M
    if kind == "w16":
        return W16_GRID if M == 1 else W16_GRID_M
    if kind == "fp8" and M == 1:
        return FP8_GRID
    return W8_GRID if M == 1 else W8_GRID_M


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


def _time(fns: list, iters: int = 60) -> float:
    """Seconds per launch: median over 5 replays of a graph of ``iters`` launches cycling over fns."""
    import torch

    for f in fns[:3]:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fns[i % len(fns)]()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters * 1e-3)
    return statistics.median(times)


def copy_bw() -> float:
    import torch

    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / _time([lambda: b.copy_(a)], 10)


def _weights(kind: str, N: int, K: int, copies: int, dev) -> list[tuple]:
    import torch

    out = []
    for _ in range(copies):
        if kind == "w4":
            qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
            s = (torch.rand(K // GROUP, N, device=dev) * 0.02 + 1e-3).to(torch.bfloat16)
            z = (torch.randn(K // GROUP, N, device=dev) * 0.01).to(torch.bfloat16)
            out.append((qw, s, z))
        elif kind == "w8":
            out.append((torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev),
                        torch.rand(N, device=dev) * 0.01 + 1e-4))
        elif kind == "fp8":
            out.append(((torch.randn(N, K, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                        torch.rand(N, device=dev) * 0.01 + 1e-4))
        else:
            out.append((torch.randn(N, K, dtype=torch.bfloat16, device=dev),))
    return out


def _nbytes(kind: str, N: int, K: int) -> int:
    if kind == "w4":
        return N * K // 2 + 2 * (K // GROUP) * N * 2
    if kind in ("w8", "fp8"):
        return N * K + N * 4
    return N * K * 2


def _reference(kind: str, x, w: tuple):
    import torch

    from rtllm.kernels import quant_gemm as qg

    if kind == "w4":
        return x.float() @ qg.dequantize_w4_t(*w, torch.float32)
    if kind == "w16":
        return x.float() @ w[0].float().t()
    return (x.float() @ w[0].float().t()) * w[1].float()


def _rel_err(y, ref) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


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
    import triton

    from rtllm.kernels.triton_attention.common import sm_count
    from rtllm.kernels.triton_quant_gemm import w4_gemv_triton, w4a16_gemm_triton, w8a16_gemm_triton
    from rtllm.kernels.triton_quant_gemv import GemvConfig, _launch_shape, w4_gemv, w8_gemv, w16_gemv

    dev = torch.device("cuda")
    ms = [int(m) for m in args.m.split(",")]
    kinds = args.kinds.split(",")
    sms = sm_count(torch.empty(1, device=dev))
    jobs = []
    for kind in kinds:
        for M in ms:
            for c in _grid(kind, M):
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
            nbytes = _nbytes(kind, N, K)
            copies = max(2, math.ceil(128 * 2**20 / nbytes))
            ws = _weights("bf16" if kind == "w16" else kind, N, K, copies, dev)
            dense = _weights("bf16", N, K, max(2, math.ceil(128 * 2**20 / (N * K * 2))), dev)
            for M in ms:
                x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
                t_bf16 = _time([partial(torch.nn.functional.linear, x, *d) for d in dense])
                if kind == "w4":
                    old = w4_gemv_triton if M == 1 else w4a16_gemm_triton
                    t_old = _time([partial(old, x, *w) for w in ws])
                elif kind == "w16":
                    t_old = t_bf16
                else:
                    t_old = _time([partial(w8a16_gemm_triton, x, *w) for w in ws])
                best = None
                k_units = K // GROUP
                fn = {"w4": w4_gemv, "w16": w16_gemv}.get(kind, w8_gemv)
                ref = _reference(kind, x, ws[0])
                for bn, bk, warps, pf, tc, stages in _grid(kind, M):
                    if kind != "w4":
                        k_units = triton.cdiv(K, bk)
                    n_tiles = triton.cdiv(N, bn)
                    for split in _splits(n_tiles, k_units, sms, 16 if tc else 5):  # tc: small programs
                        cfg = GemvConfig(bn, bk, split, warps, pf, tc, stages)
                        try:
                            rel = _rel_err(fn(x, *ws[0], config=cfg), ref)
                            t = _time([partial(fn, x, *w, config=cfg) for w in ws], 40)
                        except Exception as e:  # noqa: BLE001 - a configuration that does not run
                            print(f"  {kind} {name} M={M} {cfg.key()}: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        if args.verbose:
                            print(f"  {kind} {name} M={M} {cfg.key():16s} {t * 1e6:6.1f} us rel err {rel:.1e}")
                        if not rel < 1e-2:  # a wrong configuration is reported and never chosen
                            print(f"  !! {kind} {name} M={M} {cfg.key()}: relative error {rel}")
                        elif best is None or t < best[0]:
                            best = (t, cfg)
                if best is None:
                    continue
                t_new, cfg = best
                rel = _rel_err(fn(x, *ws[0], config=cfg), ref)
                gated = _gated_check(fn, x, ws[0], cfg) if name == "gate_up" else ""
                splits = _launch_shape(N, K // GROUP if kind == "w4" else triton.cdiv(K, cfg.block_k), cfg)[2]
                tuned.append({"kind": f"w4g{GROUP}" if kind == "w4" else kind, "M": M, "N": N, "K": K,
                              "block_n": cfg.block_n, "block_k": cfg.block_k, "split": splits,
                              "num_warps": cfg.num_warps, "prefetch": cfg.prefetch, "tc": cfg.tc,
                              "stages": cfg.stages, "us": t_new * 1e6})
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
        w4 = _weights("w4", N, K, 1, "cpu")[0]
        for cfg in (GemvConfig(32, 32, 2, 4), GemvConfig(64, 128, 2, 4, tc=True)):
            print("w4", cfg.key(), M, _rel_err(w4_gemv(x, *w4, config=cfg), _reference("w4", x, w4)))
        for kind in ("w8", "fp8"):
            w = _weights(kind, N, K, 1, "cpu")[0]
            print(kind, M, _rel_err(w8_gemv(x, *w, config=GemvConfig(16, 64, 2, 4)), _reference(kind, x, w)))
        w = _weights("bf16", N, K, 1, "cpu")[0]
        print("w16", M, _rel_err(w16_gemv(x, *w, config=GemvConfig(16, 64, 2, 4)), _reference("w16", x, w)))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
