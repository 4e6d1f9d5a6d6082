"""Tuning of the decode GEMV kernels (rtllm.kernels.triton_quant_gemv) for one (format, M, N, K): time a
grid of launch configurations on the device and keep the fastest one that computes the right product.

``rtllm build`` tunes the shapes of the model it builds and stores the choices in the engine directory
(rtllm.builder.tuning); scripts/quant_kernel_tune.py tunes the Llama-3.1-8B shapes and prints the
comparison with F.linear and the kernels of before. Kinds: "w4g<group>" (INT4 group-wise), "w8" (INT8),
"fp8" (e4m3 weight-only) and "w16" (a dense 16-bit weight).

Time: on CUDA the median of CUDA-graph replays of launches that rotate over enough copies of the weight
(>= 128 MiB by default) that L2 never holds it; elsewhere (the CPU interpreter, tests) the wall clock of
the same launches, which only exercises the procedure. A configuration whose output is more than 1%
(relative L2 norm) off the fp32 reference is reported and never chosen.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import triton

from rtllm.kernels.triton_quant_gemv_config import GemvConfig

# (block_n, block_k, num_warps, prefetch, tc, stages); CUDA cores: the per-thread columns are block_n /
# (32 num_warps); tc: the W4 tensor-core kernel (block_n rows of m64 MMAs, block_k = the group, stages
# K tiles in flight)
Tile = tuple[int, int, int, bool, bool, int]
W4_TC: list[Tile] = [(64, 128, 4, False, True, 4), (128, 128, 4, False, True, 3), (128, 128, 4, False, True, 5),
                     (128, 64, 4, False, True, 6), (256, 128, 4, False, True, 3), (256, 128, 8, False, True, 4)]
W4_CUDA: list[Tile] = [(512, 32, 4, True, False, 3), (1024, 32, 4, True, False, 3), (1024, 32, 8, True, False, 3),
                       (512, 64, 4, False, False, 3), (1024, 32, 4, False, False, 3)]
W4_GRID = W4_CUDA + W4_TC
W4_GRID_M = W4_CUDA[:3] + W4_TC  # M > 1
W8_GRID: list[Tile] = [(32, 256, 4, True, False, 3), (16, 512, 4, True, False, 3), (64, 256, 8, True, False, 3),
                       (32, 512, 8, True, False, 3), (32, 256, 4, False, False, 3), (16, 256, 4, True, False, 3)]
# fewer rows, longer rows (what won for the dense 16-bit GEMV: 8 rows x 1 KiB); fp8 at M = 1 only
FP8_GRID = W8_GRID + [(8, 1024, 4, True, False, 3), (16, 1024, 4, True, False, 3), (8, 512, 4, True, False, 3),
                      (4, 1024, 4, True, False, 3), (16, 1024, 8, True, False, 3), (8, 2048, 8, True, False, 3)]
W8_GRID_M: list[Tile] = [(32, 256, 4, True, False, 3), (16, 256, 4, True, False, 3)]
# w16: block_k in 16-bit elements (the W8 loop, two bytes a weight)
W16_GRID: list[Tile] = [
    (16, 256, 4, True, False, 3), (32, 128, 4, True, False, 3), (16, 128, 4, True, False, 3),
    (32, 256, 8, True, False, 3), (64, 128, 8, True, False, 3), (8, 512, 4, True, False, 3),
    (16, 256, 4, False, False, 3), (32, 128, 4, False, False, 3), (8, 1024, 4, True, False, 3),
    (4, 1024, 4, True, False, 3), (8, 1024, 8, True, False, 3), (16, 512, 8, True, False, 3),
    (4, 512, 4, True, False, 3)]
W16_GRID_M: list[Tile] = [(16, 256, 4, True, False, 3), (32, 128, 4, True, False, 3), (16, 128, 4, True, False, 3)]
SPLITS = (1, 2, 4, 8, 16, 32)
MAX_REL_ERR = 1e-2


def w4_group(kind: str) -> int | None:
    """The group size of a "w4g<group>" kind ("w4": 128), None for the other kinds."""
    return int(kind[3:]) if kind.startswith("w4g") else 128 if kind == "w4" else None


def grid(kind: str, M: int) -> list[Tile]:
    """The tiles tried for ``kind`` at M rows ("w4" stands for any W4 group)."""
    if w4_group(kind):
        return W4_GRID if M == 1 else W4_GRID_M
    if kind == "w16":
        return W16_GRID if M == 1 else W16_GRID_M
    if kind == "fp8" and M == 1:
        return FP8_GRID
    if kind in ("w8", "fp8"):
        return W8_GRID if M == 1 else W8_GRID_M
    raise ValueError(f"unknown GEMV kind {kind!r} (w4g<group>, w8, fp8 or w16)")


def split_counts(n_tiles: int, k_units: int, sms: int, waves: int = 5) -> list[int]:
    """Split counts giving between ~0.7 and ~``waves`` waves of programs (always at least one)."""
    out = [s for s in SPLITS if s <= k_units and 0.7 * sms <= n_tiles * s <= waves * sms]
    if not out:
        out = [min((s for s in SPLITS if s <= k_units), key=lambda s: abs(n_tiles * s - 2 * sms))]
    return out


def candidates(kind: str, M: int, N: int, K: int, sms: int) -> list[GemvConfig]:
    """Every (tile, split) configuration the tuning of one shape times."""
    group = w4_group(kind)
    out = []
    for bn, bk, warps, pf, tc, stages in grid(kind, M):
        k_units = K // group if group else triton.cdiv(K, bk)
        for split in split_counts(triton.cdiv(N, bn), k_units, sms, 16 if tc else 5):  # tc: small programs
            out.append(GemvConfig(bn, bk, split, warps, pf, tc, stages))
    return out


def time_launches(fns: Sequence[Callable[[], object]], iters: int = 60, cuda: bool = True) -> float:
    """Seconds per launch of fns (cycled): with ``cuda`` the median over 5 replays of a CUDA graph of
    ``iters`` launches; else the wall clock of ``iters`` calls (the CPU interpreter)."""
    for f in fns[:3]:
        f()
    if not cuda:
        t0 = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)]()
        return (time.perf_counter() - t0) / iters
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


def random_weights(kind: str, N: int, K: int, copies: int, device: torch.device | str) -> list[tuple]:
    """``copies`` random weights of the kind's layout (what its GEMV entry point takes after x); "bf16": a
    dense bf16 weight (the F.linear baseline's and w16's)."""
    out = []
    for _ in range(copies):
        if group := w4_group(kind):
            qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device)
            s = (torch.rand(K // group, N, device=device) * 0.02 + 1e-3).to(torch.bfloat16)
            z = (torch.randn(K // group, N, device=device) * 0.01).to(torch.bfloat16)
            out.append((qw, s, z))
        elif kind == "w8":
            out.append((torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device),
                        torch.rand(N, device=device) * 0.01 + 1e-4))
        elif kind == "fp8":
            out.append(((torch.randn(N, K, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                        torch.rand(N, device=device) * 0.01 + 1e-4))
        else:
            out.append((torch.randn(N, K, dtype=torch.bfloat16, device=device),))
    return out


def weight_bytes(kind: str, N: int, K: int) -> int:
    """Bytes one launch reads of the weight (codes, scales and zeros)."""
    if group := w4_group(kind):
        return N * K // 2 + 2 * (K // group) * N * 2
    if kind in ("w8", "fp8"):
        return N * K + N * 4
    return N * K * 2


def reference(kind: str, x: torch.Tensor, w: tuple) -> torch.Tensor:
    """The exact product x @ W^T in fp32."""
    from rtllm.kernels import quant_gemm as qg

    if w4_group(kind):
        return x.float() @ qg.dequantize_w4_t(*w, torch.float32)
    if kind in ("w16", "bf16"):
        return x.float() @ w[0].float().t()
    return (x.float() @ w[0].float().t()) * w[1].float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def gemv_fn(kind: str) -> Callable:
    from rtllm.kernels.triton_quant_gemv import w4_gemv, w8_gemv, w16_gemv

    return w4_gemv if w4_group(kind) else w16_gemv if kind == "w16" else w8_gemv


@dataclass
class TunedGemv:
    kind: str
    M: int
    N: int
    K: int
    config: GemvConfig
    seconds: float
    rel_err: float
    timed: list[tuple[GemvConfig, float, float]]  # every configuration timed: (config, seconds, relative error)
    failed: list[str]  # configurations that did not run or computed a wrong product, with why

    def row(self) -> dict:
        """The JSON row triton_quant_gemv_config reads (its RTLLM_QUANT_GEMV_CONFIG file, an engine's
        kernel_tuning.json)."""
        c = self.config
        return {"kind": self.kind, "M": self.M, "N": self.N, "K": self.K, "block_n": c.block_n,
                "block_k": c.block_k, "split": c.split, "num_warps": c.num_warps, "prefetch": c.prefetch,
                "tc": c.tc, "stages": c.stages, "us": round(self.seconds * 1e6, 2)}


def tune(kind: str, M: int, N: int, K: int, device: torch.device | str, configs: Sequence[GemvConfig] | None = None,
         rotate_bytes: int = 128 * 2**20, iters: int | None = None) -> TunedGemv | None:
    """The fastest configuration of ``configs`` (default: :func:`candidates` for this device's SM count) for
    an [M, K] x [K, N] launch of ``kind`` on ``device``, timed over ``iters`` launches (default 40 on CUDA, 2
    in the interpreter) cycling over up to ``iters`` weight copies of ``rotate_bytes`` in all; None when none
    runs correctly."""
    from rtllm.kernels.triton_attention.common import sm_count

    device = torch.device(device)
    iters = iters or (40 if device.type == "cuda" else 2)
    x = torch.randn(M, K, dtype=torch.bfloat16, device=device)
    configs = list(configs or candidates(kind, M, N, K, sm_count(x)))
    copies = min(iters, max(2, math.ceil(rotate_bytes / weight_bytes(kind, N, K))))
    ws = random_weights(kind, N, K, copies, device)
    fn = gemv_fn(kind)
    ref = reference(kind, x, ws[0])
    timed, failed = [], []
    for cfg in configs:
        try:
            err = rel_err(fn(x, *ws[0], config=cfg), ref)
            if not err < MAX_REL_ERR:
                failed.append(f"{cfg.key()}: relative error {err:.2e}")
                continue
            t = time_launches([partial(fn, x, *w, config=cfg) for w in ws], iters, device.type == "cuda")
        except Exception as e:  # noqa: BLE001 - a tile this device cannot run (resources): skipped, reported
            failed.append(f"{cfg.key()}: {type(e).__name__}: {str(e)[:160]}")
            continue
        timed.append((cfg, t, err))
    if not timed:
        return None
    cfg, t, err = min(timed, key=lambda c: c[1])
    return TunedGemv(kind, M, N, K, cfg, t, err, timed, failed)
