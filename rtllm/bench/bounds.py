"""Hardware ceilings measured in the same run, and the roofline bound of a workload.

Decode is bound by memory bandwidth (weights + KV read per step); prefill by tensor-core FLOP/s.
A mixture-of-experts model counts active parameters only: a token runs k of the E experts, and a
decode step reads the weights of the experts its batch routes to (k of E at batch 1).
Both ceilings are measured on the device the benchmark runs on: a large device-to-device copy
(bytes read + written) and a large matmul in the model's dtype (on a CPU through the engine's own
packed GEMM, so the bound is what this CPU's cores reach, not a datasheet figure).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Hardware:
    name: str
    copy_bandwidth: float  # bytes / s (read + write)
    matmul_flops: float  # FLOP / s at the model's dtype


def time_cuda(fn, iters: int = 20) -> float:
    """Median seconds per call of ``fn`` on the current CUDA device (events around each call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def cuda_graphed(fn, calls: int = 1):
    """``fn`` called ``calls`` times, captured in one CUDA graph (after a warm-up on a side stream, as
    capture requires); returns the graph's replay, to time with ``time_cuda`` (divide by ``calls``):
    launch overhead then counts as it does in the engine's decode graphs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g.replay


def time_cpu(fn, iters: int = 5) -> float:
    """Median seconds per call of ``fn`` on the CPU (after one warm-up call)."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure_cpu(dtype: torch.dtype, threads: int | None = None) -> Hardware:
    """The CPU's ceilings as the engine meets them: a 256 MiB copy (read + written) and a 2048^3 GEMM in
    ``dtype`` through the engine's own CPU GEMM (oneDNN-packed weight where this CPU packs the dtype), on
    ``threads`` threads (a rank's share of the cores when the model is split; default: this process's)."""
    from rtllm.kernels.gemm import linear, pack_for_cpu

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        src = torch.ones(1 << 27, dtype=torch.bfloat16)  # 256 MiB
        dst = torch.empty_like(src)
        bw = 2 * src.numel() * src.element_size() / time_cpu(lambda: dst.copy_(src))
        m = 2048
        x, w = torch.randn(m, m, dtype=dtype), torch.randn(m, m, dtype=dtype)
        w.cpu_packed = pack_for_cpu(w)
        flops = 2 * m**3 / time_cpu(lambda: linear(x, w))
        return Hardware(_cpu_name(), bw, flops)
    finally:
        torch.set_num_threads(before)


def measure_hardware(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> Hardware | None:
    if device.type == "cpu":
        return measure_cpu(dtype, threads)
    if device.type != "cuda":
        return None
    n = 1 << 28  # 512 MiB of bf16 in, as much out
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / time_cuda(lambda: dst.copy_(src))
    m = 8192
    x = torch.randn(m, m, dtype=dtype, device=device)
    y = torch.randn(m, m, dtype=dtype, device=device)
    flops = 2 * m**3 / time_cuda(lambda: x @ y, iters=10)
    src = dst = x = y = None
    torch.cuda.empty_cache()
    return Hardware(torch.cuda.get_device_name(device), bw, flops)


@dataclass
class ModelCost:
    weight_bytes: int  # bytes of every weight a forward may read (all experts of an MoE model)
    active_params: int  # multiply-adds per token in the linear layers (a token's k experts only)
    kv_bytes_per_token: int
    num_layers: int
    num_heads: int
    head_dim: int
    expert_bytes: int = 0  # MoE: the routed experts' part of weight_bytes
    num_experts: int = 0
    experts_per_tok: int = 0
    head_params: int = 0  # the LM head's part of active_params: a prefill runs it on each prompt's last token only

    def prompt_params(self, isl: int) -> int:
        """Multiply-adds of a prompt of ``isl`` tokens in the linear layers: all of them for every token,
        but the LM head for the last one only (the only position sampled)."""
        return (self.active_params - self.head_params) * isl + self.head_params

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step of ``batch`` sequences reads: all but the routed experts, plus the
        experts the batch uses: k of E at batch 1; at batch B the expected share of experts hit when each
        token picks k of E uniformly, 1 - (1 - k/E)^B (random weights route close to uniformly)."""
        if not self.num_experts or not self.expert_bytes:
            return float(self.weight_bytes)
        hit = 1.0 - (1.0 - self.experts_per_tok / self.num_experts) ** batch
        return self.weight_bytes - self.expert_bytes + self.expert_bytes * hit


def active_params(weights: int, expert_weights: int = 0, num_experts: int = 0, experts_per_tok: int = 0) -> int:
    """Multiply-adds per token of a model with ``weights`` logical linear weights, ``expert_weights`` of them
    the routed experts': every weight once, except that a token runs only k of the E experts."""
    if not num_experts:
        return weights
    return weights - expert_weights + expert_weights * experts_per_tok // num_experts


def workload_bound(cost: ModelCost, hw: Hardware, num_requests: int, isl: int, osl: int, concurrency: int) -> dict:
    """Lower bound on the time of the whole workload, run in waves of ``concurrency`` requests.

    Prefill: 2*params*tokens (the LM head on each prompt's last token only, which samples the first
    output token) + causal attention FLOPs at matmul peak. Then OSL - 1 decode steps, each of a wave of
    B sequences max(bytes / bandwidth, FLOPs / peak), where bytes = weights + KV of the B contexts.
    """
    waves = []
    left = num_requests
    while left > 0:
        waves.append(min(concurrency, left))
        left -= concurrency
    total = 0.0
    prefill_s = 0.0
    decode_s = 0.0
    for b in waves:
        attn = 2 * 2 * cost.num_layers * cost.num_heads * cost.head_dim * (isl * isl / 2)  # QK^T and PV, causal
        p = b * (2 * cost.prompt_params(isl) + attn) / hw.matmul_flops
        prefill_s += p
        for step in range(1, osl):  # the prefill samples the first output token
            ctx = isl + step
            bytes_ = cost.step_weight_bytes(b) + b * ctx * cost.kv_bytes_per_token
            flops = b * (2 * cost.active_params + 4 * cost.num_layers * cost.num_heads * cost.head_dim * ctx)
            decode_s += max(bytes_ / hw.copy_bandwidth, flops / hw.matmul_flops)
    total = prefill_s + decode_s
    return {"bound_s": total, "prefill_bound_s": prefill_s, "decode_bound_s": decode_s,
            "bound_output_tok_s": num_requests * osl / total,
            "decode_weight_bytes_batch1": cost.step_weight_bytes(1),
            "bound_ttft_s": (2 * cost.prompt_params(isl) + 2 * 2 * cost.num_layers * cost.num_heads
                             * cost.head_dim * isl * isl / 2) / hw.matmul_flops}
