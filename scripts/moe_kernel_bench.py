"""MoE kernels on CUDA at Qwen3-30B-A3B (128 experts, top 8, H 2048, I 768) and Mixtral-8x7B
(8 experts, top 2, H 4096, I 14336) shapes: check and time them.

    python scripts/moe_kernel_bench.py                  # both shapes, bf16
    python scripts/moe_kernel_bench.py --only qwen3 --tune   # also sweep the decode GEMM tiles
    TRITON_INTERPRET=1 python scripts/moe_kernel_bench.py --smoke   # CPU: tiny shapes, logic only

Each row: T tokens through one MoE layer (router logits given): Triton routing + alignment + the two
grouped GEMMs + the combine, checked against the torch references (routing: the same probabilities
chosen; experts: max |diff| / max |ref|), timed eagerly and as a CUDA graph replay (how the engine
runs decode). Bandwidth: bytes of the experts the batch hits (each read once) + activations, over
the graph time, against the copy bandwidth measured here; FLOP/s: 2 * T * k * 3 * H * I over the
graph time. Exits 1 if a kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial

import torch

from rtllm.bench.bounds import time_cuda
from rtllm.kernels import moe, triton_moe

SHAPES = {"qwen3": (128, 8, 2048, 768, True), "mixtral": (8, 2, 4096, 14336, True)}  # E, k, H, I, renormalize
failures: list[str] = []


def median_ms(fn, iters: int = 50) -> float:
    return time_cuda(fn, iters) * 1e3


def graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth() -> float:
    bufs = torch.empty(2, 1 << 28, dtype=torch.bfloat16, device="cuda")
    return 2 * bufs[0].numel() * 2 / (median_ms(lambda: bufs[1].copy_(bufs[0]), 20) / 1e3)


def layer_fn(x, logits, w13, w2, k, renorm, config=None):
    def run():
        w, ids = triton_moe.fused_topk_triton(logits, k, renorm)
        return triton_moe.fused_experts_triton(x, w13, w2, w, ids, config=config)
    return run


def check(name: str, T: int, x, logits, w13, w2, k: int, renorm: bool) -> None:
    w, ids = triton_moe.fused_topk_triton(logits, k, renorm)
    w_ref, ids_ref = moe.fused_topk_torch(logits, k, renorm)
    probs = torch.softmax(logits.float(), -1)
    if not torch.allclose(probs.gather(1, ids.long()), probs.gather(1, ids_ref.long()), atol=1e-6, rtol=0) or \
            not torch.allclose(w, w_ref, atol=1e-5, rtol=1e-4):
        failures.append(f"{name} T={T} routing")
    out = triton_moe.fused_experts_triton(x, w13, w2, w_ref, ids_ref)
    ref = moe.fused_experts_torch(x, w13, w2, w_ref, ids_ref)
    rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()
    if rel > 2e-2:
        failures.append(f"{name} T={T} experts rel err {rel:.3g}")
    return rel


def run_shape(name: str, tokens: list[int], bw: float, dtype: torch.dtype, tune: bool) -> None:
    E, k, H, inter, renorm = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=dtype, generator=g) * 0.02
    w2 = torch.randn(E, H, inter, device="cuda", dtype=dtype, generator=g) * 0.02
    gate = torch.randn(E, H, device="cuda", dtype=dtype, generator=g) * 0.02
    expert_bytes = 3 * H * inter * w13.element_size()
    print(f"\n== {name}: E {E}, top-{k}, H {H}, I {inter}, {dtype}; {expert_bytes / 2**20:.1f} MiB per expert")
    print(f"{'T':>6} {'rel err':>8} {'eager ms':>9} {'graph ms':>9} {'ref ms':>8} {'hit':>4} {'GB/s':>7} "
          f"{'of copy':>7} {'TFLOP/s':>8}")
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        logits = x @ gate.T
        rel = check(name, T, x, logits, w13, w2, k, renorm)
        fn = layer_fn(x, logits, w13, w2, k, renorm)
        eager = median_ms(fn)
        graph = median_ms(graphed(fn))
        w, ids = moe.fused_topk_torch(logits, k, renorm)
        ref_fn = partial(moe.fused_experts_torch, x, w13, w2, w, ids)
        ref = median_ms(ref_fn, 10) if T <= 2048 else float("nan")
        hit = int(torch.unique(ids).numel())
        nbytes = hit * expert_bytes + T * H * x.element_size() * (2 + k) + T * k * inter * x.element_size() * 2
        gbs = nbytes / (graph / 1e3) / 1e9
        tflops = 2 * T * k * 3 * H * inter / (graph / 1e3) / 1e12
        print(f"{T:>6} {rel:>8.1e} {eager:>9.3f} {graph:>9.3f} {ref:>8.3f} {hit:>4} {gbs:>7.0f} "
              f"{gbs * 1e9 / bw:>7.1%} {tflops:>8.1f}")
    if tune:
        tune_decode(name, w13, w2, gate, k, renorm, expert_bytes, bw, g)


def tune_decode(name, w13, w2, gate, k, renorm, expert_bytes, bw, g) -> None:
    """Sweep the grouped GEMM tiles at decode batch sizes (graph replay times)."""
    H = w13.shape[2]
    print(f"\n-- {name} decode tile sweep (graph ms; best first)")
    for T in (1, 4):
        x = torch.randn(T, H, device="cuda", dtype=w13.dtype, generator=g)
        logits = x @ gate.T
        rows = []
        for bm, bn, bk, nw, ns in itertools.product((16,), (32, 64, 128), (64, 128, 256), (4, 8), (4,)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=nw, num_stages=ns)
            try:
                t = median_ms(graphed(layer_fn(x, logits, w13, w2, k, renorm, cfg)), 20)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit)
                rows.append((float("inf"), cfg, type(e).__name__))
                continue
            rows.append((t, cfg, ""))
        rows.sort(key=lambda r: r[0])
        hit = int(torch.unique(moe.fused_topk_torch(logits, k, renorm)[1]).numel())
        for t, cfg, err in rows[:5]:
            print(f"  T={T:<3} {t:.4f} ms  {hit * expert_bytes / (t / 1e3) / bw:6.1%} of copy  {cfg} {err}")


def smoke() -> int:
    """CPU under TRITON_INTERPRET=1: tiny shapes through the same checks."""
    E, k, H, inter = 8, 2, 32, 16
    w13 = torch.randn(E, 2 * inter, H) * 0.1
    w2 = torch.randn(E, H, inter) * 0.1
    for T in (1, 5):
        x = torch.randn(T, H)
        check("smoke", T, x, torch.randn(T, E), w13, w2, k, True)
    print("smoke:", "FAIL " + "; ".join(failures) if failures else "ok")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--tokens", default="1,2,8,32,128,512,2048,8192")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in [args.only] if args.only else list(SHAPES):
        run_shape(name, tokens, bw, torch.bfloat16, args.tune)
        torch.cuda.empty_cache()
    if failures:
        print("FAILURES:", "; ".join(failures))
        return 1
    print("\nall kernels agree with their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
