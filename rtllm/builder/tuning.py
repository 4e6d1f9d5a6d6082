"""Kernel tuning at build time: the decode GEMV launches of the model being built, each timed over a grid
of launch configurations on the build GPU (rtllm.kernels.gemv_tuning), the fastest stored in the engine
directory's ``kernel_tuning.json`` (rtllm.models.engine_dir.TUNING_NAME) with the GPU's name and the
Triton version. ``LLM(engine_dir)`` on the same GPU and Triton uses them as they are (nothing is tuned at
load); elsewhere it warns and keeps the built-in table (rtllm.runtime.kernel_tuning).

What is tuned: every decode GEMV shape the model's layers launch on CUDA, at each row count up to the
kernels' limit (rtllm.kernels.quant_gemm.W4_GEMV_MAX_M / W8_GEMV_MAX_M, rtllm.kernels.gemm.DENSE_GEMV_MAX_M):
INT4 (per group size), INT8 and FP8 weight-only layers, the INT8 LM head, 16-bit dense layers whose GEMM
runs bias-free (row-parallel ones add their bias after the all-reduce), and the MoE router (its GEMM
where the fused router launch does not run). Not tuned: the MoE expert GEMVs (their own launch rule) and
the prefill GEMMs (cuBLAS / the tensor-core Triton kernels with fixed tiles). Tuning times are the GPU's,
so the file differs from build to build; config.json and the weights stay byte-identical. The
configurations apply to the process that loads the engine (rtllm.kernels.triton_quant_gemv_config.use_tuned).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
import triton
from torch import nn

from rtllm.kernels import gemv_tuning
from rtllm.kernels.gemm import DENSE_GEMV_MAX_M
from rtllm.kernels.quant_gemm import W4_GEMV_MAX_M, W8_GEMV_MAX_M
from rtllm.layers.embedding import LMHead
from rtllm.layers.linear import Linear
from rtllm.layers.moe import MoeRouter
from rtllm.layers.parallel_linear import ParallelLMHead, RowParallelLinear
from rtllm.layers.quant.fp8 import FP8Linear
from rtllm.layers.quant.int4 import W4A16Linear
from rtllm.layers.quant.int8 import W8A16Linear

logger = logging.getLogger(__name__)

GemvKey = tuple[str, int, int, int]  # (kind, M, N, K)


def decode_gemv_shapes(model: nn.Module) -> list[GemvKey]:
    """The (kind, M, N, K) of every decode GEMV launch ``model``'s layers make on CUDA (sorted, unique)."""
    keys: set[GemvKey] = set()
    for m in model.modules():
        if isinstance(m, W4A16Linear):
            if m.backend == "cpu":
                continue
            kind, max_m, n, k = f"w4g{m.group_size}", W4_GEMV_MAX_M, m.out_features, m.in_features
        elif isinstance(m, W8A16Linear | FP8Linear):
            kind = "fp8" if isinstance(m, FP8Linear) else "w8"
            max_m, n, k = W8_GEMV_MAX_M, m.out_features, m.in_features
        elif isinstance(m, Linear | LMHead | ParallelLMHead | MoeRouter):
            w = m.weight
            # a row-parallel layer adds its bias after the all-reduce: its GEMM runs bias-free
            bias_free = getattr(m, "bias", None) is None or isinstance(m, RowParallelLinear)
            if w.dtype not in (torch.bfloat16, torch.float16) or not bias_free:
                continue
            kind, max_m, (n, k) = "w16", DENSE_GEMV_MAX_M, w.shape
        else:
            continue
        keys.update((kind, M, int(n), int(k)) for M in range(1, max_m + 1))
    return sorted(keys)


def tune_gemvs(shapes: Iterable[GemvKey], device: torch.device,
               configs: dict[GemvKey, list] | None = None) -> dict:
    """Tune each shape on ``device``; returns what kernel_tuning.json holds: the GPU's name (None on a CPU,
    where only tests run the kernels, in the interpreter), the Triton and torch versions, the rows
    (rtllm.kernels.gemv_tuning.TunedGemv.row), the configurations that failed, and the seconds it took.
    ``configs``: per shape, the configurations to try instead of the default grid (tests)."""
    t0 = time.perf_counter()
    rows, failed = [], {}
    shapes = list(shapes)
    for i, key in enumerate(shapes):
        kind, M, N, K = key
        t1 = time.perf_counter()
        best = gemv_tuning.tune(kind, M, N, K, device, (configs or {}).get(key))
        if best is None:
            logger.warning("kernel tuning: no configuration of the %s GEMV ran correctly at M=%d, N=%d, K=%d "
                           "(the built-in rule stays)", kind, M, N, K)
        else:
            rows.append(best.row())
            logger.info("kernel tuning %d/%d: %s M=%d N=%d K=%d -> %s, %.1f us (%d tried, %.1f s)", i + 1,
                        len(shapes), kind, M, N, K, best.config.key(), best.seconds * 1e6, len(best.timed),
                        time.perf_counter() - t1)
        if best is None or best.failed:
            failed[f"{kind} M={M} N={N} K={K}"] = [] if best is None else best.failed
    return {
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "triton_version": triton.__version__,
        "torch_version": torch.__version__,
        "gemv": rows,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
