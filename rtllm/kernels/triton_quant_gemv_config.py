"""Launch configurations of the decode GEMV kernels (rtllm.kernels.triton_quant_gemv): the tile /
split choice per (format, M, N, K), from the H100 tuning table, a JSON file named by
RTLLM_QUANT_GEMV_CONFIG (scripts/quant_kernel_tune.py writes one), or a default rule for other
shapes.

A gate|up launch with SiLU-and-mul in its epilogue uses the gate|up projection's own entry (N = 2I):
its tile of block_n columns is block_n / 2 gate and block_n / 2 up columns, so the configuration
gives the programs, loads and splits of the unfused launch (and its tuned time, plus the epilogue)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split: int  # requested splits of K (rounded to whole groups / tiles)
    num_warps: int
    prefetch: bool = True
    tc: bool = False  # W4: the tensor-core kernel (bf16 / fp16 x; block_k a multiple of 32, block_n >= 64)
    stages: int = 3  # tc: the software pipeline's depth (K tiles of weights in flight per program)

    def key(self) -> str:
        return (f"n{self.block_n}k{self.block_k}s{self.split}w{self.num_warps}{'p' if self.prefetch else ''}"
                f"{f't{self.stages}' if self.tc else ''}")


# Tuned on an H100 (scripts/quant_kernel_tune.py --m 1, 2026-11-25; Llama-3.1-8B shapes and the INT8
# LM head): (kind, M, N, K) -> config, kind "w4g<group>", "w8" (int8), "fp8" (e4m3 bytes) or "w16" (a dense
# 16-bit weight). M > 1
# without an entry uses M = 1's. Times: graph replays, weights rotated past L2. W4 retuned with the
# tensor-core kernel in the grid (--kinds w4 --m 1,2, same day): it wins down at M = 1 and every
# shape at M = 2.
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {
    ("w4g128", 1, 6144, 4096): GemvConfig(512, 64, 32, 4, False),  # 11.3 us
    ("w4g128", 1, 4096, 4096): GemvConfig(512, 64, 32, 4, False),  # 9.6 us
    ("w4g128", 1, 28672, 4096): GemvConfig(1024, 32, 16, 4, True),  # 30.0 us
    ("w4g128", 1, 4096, 14336): GemvConfig(128, 128, 16, 4, False, tc=True),  # 20.0 us
    ("w4g128", 2, 6144, 4096): GemvConfig(128, 128, 8, 4, False, tc=True),  # 12.8 us
    ("w4g128", 2, 4096, 4096): GemvConfig(256, 128, 16, 4, False, tc=True),  # 10.9 us
    ("w4g128", 2, 28672, 4096): GemvConfig(256, 128, 2, 4, False, tc=True),  # 37.9 us
    ("w4g128", 2, 4096, 14336): GemvConfig(256, 128, 16, 4, False, tc=True),  # 21.6 us
    ("w8", 1, 6144, 4096): GemvConfig(16, 512, 1, 4, True),  # 11.6 us
    ("w8", 1, 4096, 4096): GemvConfig(16, 512, 1, 4, True),  # 9.3 us
    ("w8", 1, 28672, 4096): GemvConfig(32, 256, 1, 4, False),  # 44.2 us
    ("w8", 1, 4096, 14336): GemvConfig(32, 256, 4, 4, False),  # 25.1 us
    ("w8", 1, 128256, 4096): GemvConfig(32, 256, 1, 4, False),  # 178.0 us
    # fp8: retuned 2026-12-07 (twelfth session) after the codes are read as int32 words (the prefetching
    # tiles' byte regrouping gone): qkv 11.2 -> 9.6 us, o 8.9 -> 7.0, gate_up 41.7 -> 40.8, down 23.5 -> 20.9
    ("fp8", 1, 6144, 4096): GemvConfig(8, 512, 1, 4, True),  # 9.6 us
    ("fp8", 1, 4096, 4096): GemvConfig(16, 1024, 1, 4, True),  # 7.0 us
    ("fp8", 1, 28672, 4096): GemvConfig(32, 256, 1, 4, False),  # 40.8 us
    ("fp8", 1, 4096, 14336): GemvConfig(16, 1024, 1, 4, True),  # 20.9 us
    # dense bf16 (--kinds w16 --m 1,2, 2026-12-07; F.linear in the same run in brackets); M = 2 lost to
    # F.linear on every shape (0.76-0.92x), so rtllm.kernels.gemm runs the GEMV at M = 1 only
    ("w16", 1, 6144, 4096): GemvConfig(16, 256, 1, 4, True),  # 20.0 us (20.4)
    ("w16", 1, 4096, 4096): GemvConfig(8, 512, 1, 4, True),  # 13.6 us (15.7)
    ("w16", 1, 28672, 4096): GemvConfig(8, 512, 1, 4, True),  # 78.8 us (82.1)
    ("w16", 1, 4096, 14336): GemvConfig(8, 512, 1, 4, True),  # 42.0 us (43.7)
    ("w16", 1, 5120, 2048): GemvConfig(8, 512, 1, 4, True),  # 9.3 us (9.9), Qwen3-30B-A3B qkv
    ("w16", 1, 2048, 4096): GemvConfig(8, 512, 1, 4, True),  # 8.7 us (10.1), Qwen3-30B-A3B o_proj
}

_ENV_TABLE = "RTLLM_QUANT_GEMV_CONFIG"  # a JSON file of tuned configs (the tune script writes one)
_env_loaded = False
_env_keys: set[tuple[str, int, int, int]] = set()  # the shapes the RTLLM_QUANT_GEMV_CONFIG file sets


def use_tuned(rows: list[dict], override_env: bool = False) -> int:
    """Make this process's GEMV launches use the tuned configurations ``rows`` (the JSON rows of
    rtllm.kernels.gemv_tuning.TunedGemv.row: kind, M, N, K, block_n, block_k, split, num_warps and optionally
    prefetch, tc, stages), over the table's entries for the same shapes, except those the
    RTLLM_QUANT_GEMV_CONFIG file sets (unless ``override_env``); returns how many are now in use. The table
    is the process's: every engine of an in-process executor shares it (the default multi-process executor
    gives each engine its own worker process). A malformed row raises ValueError naming it."""
    if not _env_loaded and not override_env:
        _load_env_table()
    parsed = {}
    for row in rows:
        try:
            key = (str(row["kind"]), int(row["M"]), int(row["N"]), int(row["K"]))
            cfg = GemvConfig(int(row["block_n"]), int(row["block_k"]), int(row["split"]), int(row["num_warps"]),
                             bool(row.get("prefetch", True)), bool(row.get("tc", False)), int(row.get("stages", 3)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"GEMV configuration row {row!r}: {type(e).__name__}: {e}") from e
        if min(cfg.block_n, cfg.block_k, cfg.split, cfg.num_warps, cfg.stages, *key[1:]) < 1:
            raise ValueError(f"GEMV configuration row {row!r}: sizes must be positive")
        if override_env or key not in _env_keys:
            parsed[key] = cfg
    TUNED.update(parsed)
    return len(parsed)


def _load_env_table() -> None:
    global _env_loaded
    _env_loaded = True
    path = os.environ.get(_ENV_TABLE)
    if not path:
        return
    with open(path) as f:
        rows = json.load(f)
    use_tuned(rows, override_env=True)
    _env_keys.update((str(r["kind"]), int(r["M"]), int(r["N"]), int(r["K"])) for r in rows)


def _default_config(kind: str, M: int, N: int, K: int, sms: int) -> GemvConfig:
    """For shapes not in the tuned table, what the tuning chose at the 8B shapes: W4 512 columns
    (1024 from 16K outputs) per 4-warp program and a split of K giving 2-3 programs per SM; W8 / FP8
    16 rows x 512 bytes (32 x 256 for wide layers), split only when the rows give under a wave; a dense
    16-bit weight (W16) 8 rows x 512 elements."""
    if kind in ("w8", "fp8", "w16"):
        bn, bk = (16, 512) if N <= 8192 else (32, 256)
        if kind == "w16":  # what the tuning chose at M = 1: 8 rows x 1 KiB, no split
            return GemvConfig(8, 512, 1, 4, True)
        n_tiles = triton.cdiv(N, bn)
        split = 1 if n_tiles >= sms else max(1, min(4, (2 * sms) // n_tiles, K // (4 * bk)))
        return GemvConfig(bn, bk, split, 4, bn == 16)
    group = int(kind[3:])
    bn, bk = (1024, 32) if N >= 16384 else (512, 64)
    n_tiles = triton.cdiv(N, bn)
    split = max(1, min(K // group, 32, triton.cdiv(5 * sms, 2 * n_tiles)))
    return GemvConfig(bn, min(bk, group), split, 4, False)


def gemv_config(kind: str, M: int, N: int, K: int, device_sms: int) -> GemvConfig:
    if not _env_loaded:
        _load_env_table()
    cfg = TUNED.get((kind, M, N, K))
    if cfg is None and M > 1:
        cfg = TUNED.get((kind, 1, N, K))
    return cfg or _default_config(kind, M, N, K, device_sms)
