"""MoE-model decode fusions on CUDA against the launches they replace (also run by
scripts/moe_kernel_bench.py after its tables, or alone with its --fusions).

    python scripts/moe_fusion_bench.py [--layers 8]

Two decode fusions against the launches they replace, at T = 1, 4 and 8 tokens, each timed as a
graph over LAYERS layers' weights (per-layer us):

- router: the router GEMM (cuBLAS) + fused_topk_triton vs router_topk_triton (GEMM + routing in one
  launch; a num_warps sweep); agreement over 200 random inputs: rows with the same expert ids, rows
  bit-equal in ids and weights, and the largest weight difference where the ids agree (the fused
  GEMM sums in another order than cuBLAS: a bf16 logit can round one ulp apart);
- qk norm: Qwen3-30B-A3B attention (32 q / 4 kv heads of 128), q_norm + k_norm (two RMSNorm
  launches, as LlamaAttention ran them) + RoPE / cache write vs the one fused launch, bf16 and FP8
  caches; agreement: q, k and both caches compared bit for bit.

Exits 1 if the fused router picks other experts than the unfused path in more than 1% of rows, or the
fused q/k norm is not bit-equal.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

from rtllm.bench.bounds import cuda_graphed as graphed
from rtllm.bench.bounds import time_cuda
from rtllm.kernels import triton_attention, triton_moe_routing, triton_norm, triton_rope


def median_ms(fn, iters: int = 50) -> float:
    """Median ms of ``iters`` calls of ``fn``, by CUDA events."""
    return time_cuda(fn, iters) * 1e3


QWEN3_ATTN = (32, 4, 128, 1e6, 1e-6)  # Qwen3-30B-A3B: q heads, kv heads, head_dim, rope theta, rms eps
FUSION_TOKENS = (1, 4, 8)  # <= triton_moe_routing.ROUTER_FUSED_MAX_TOKENS


def router_agreement(x_rows, gate, k, renorm) -> tuple[float, float, float]:
    """(share of rows with the same expert ids, share bit-equal in ids and weights, max |weight diff| where
    the ids agree): router_topk_triton against the router GEMM + fused_topk_triton, over inputs x_rows."""
    same = exact = 0
    rows = 0
    wdiff = 0.0
    for x in x_rows:
        wf, idf = triton_moe_routing.router_topk_triton(x, gate, k, renorm)
        wu, idu = triton_moe_routing.fused_topk_triton(F.linear(x, gate), k, renorm)
        ok = (idf == idu).all(dim=1)
        same += int(ok.sum())
        exact += int((ok & (wf == wu).all(dim=1)).sum())
        if ok.any():
            wdiff = max(wdiff, float((wf - wu)[ok].abs().max()))
        rows += x.shape[0]
    return same / rows, exact / rows, wdiff


def routers_unfused(x, gates, k, renorm) -> None:
    for gate in gates:
        triton_moe_routing.fused_topk_triton(F.linear(x, gate), k, renorm)


def routers_fused(x, gates, k, renorm, warps=None) -> None:
    for gate in gates:
        triton_moe_routing.router_topk_triton(x, gate, k, renorm, num_warps=warps)


def router_fusion(shapes: dict, dtype, n_layers: int, trials: int = 200, tokens=FUSION_TOKENS,
                  device="cuda") -> list[str]:
    """The router GEMM + top-k, unfused vs one launch, at ``shapes`` (name -> E, k, H, I, renormalize; see
    the module docstring). Returns the failures."""
    failures: list[str] = []
    timed = device == "cuda"
    print("\n-- router GEMM + routing: cuBLAS GEMM + fused_topk_triton vs router_topk_triton (one launch)")
    if timed:
        print(f"{'shape':>8} {'T':>3} {'same ids':>9} {'bit-eq':>7} {'max dw':>8} {'unfused us':>11} "
              f"{'fused us':>9}  fused us by num_warps")
    g = torch.Generator(device=device).manual_seed(1)
    for name, (E, k, H, _inter, renorm) in shapes.items():
        if not timed:
            E, H = min(E, 16), 256
            k = min(k, 4)
        gates = [torch.randn(E, H, device=device, dtype=dtype, generator=g) * 0.02 for _ in range(n_layers)]
        for T in tokens:
            if not triton_moe_routing.router_fusable(T, E, H, gates[0].element_size()):
                print(f"{name:>8} {T:>3}  unfused: past the fused launch's limits (triton_moe_routing.router_fusable)")
                continue
            xs = [torch.randn(T, H, device=device, dtype=dtype, generator=g) for _ in range(trials)]
            same, exact, wdiff = router_agreement(xs, gates[0], k, renorm)
            if same < 0.99:
                failures.append(f"fused router {name} T={T}: same expert ids in only {same:.1%} of rows")
            if not timed:
                print(f"  {name} T={T}: same ids {same:.1%}, bit-equal {exact:.1%}, max weight diff {wdiff:.2g}")
                continue
            def per_layer_us(fn, *extra, x=xs[0], gates=gates, k=k, renorm=renorm) -> float:
                return median_ms(graphed(partial(fn, x, gates, k, renorm, *extra))) / n_layers * 1e3

            t_un, t_fu = per_layer_us(routers_unfused), per_layer_us(routers_fused)
            sweep = "  ".join(f"{w}: {per_layer_us(routers_fused, w):.1f}" for w in (1, 2, 4, 8))
            print(f"{name:>8} {T:>3} {same:>9.1%} {exact:>7.1%} {wdiff:>8.1e} {t_un:>11.1f} {t_fu:>9.1f}  {sweep}")
    return failures


def qk_norm_inputs(T, dtype, cache_dtype, device, shape=QWEN3_ATTN, block=16, blocks=64, seed=0):
    hq, hkv, d, theta, eps = shape
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=device, dtype=dtype, generator=g) * 2
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # as LlamaAttention splits the qkv GEMM's output
    qw = 1 + 0.1 * torch.randn(d, device=device, dtype=dtype, generator=g)
    kw = 1 + 0.1 * torch.randn(d, device=device, dtype=dtype, generator=g)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=device).float() / d)
    f = torch.outer(torch.arange(4096, device=device).float(), inv)
    cs = torch.cat((f.cos(), f.sin()), -1)
    positions = torch.randint(0, 4096, (T,), device=device, generator=g)
    slots = torch.randperm(block * blocks, device=device, generator=g)[:T]
    caches = [torch.zeros(blocks, block, hkv, d, device=device, dtype=dtype).to(cache_dtype) for _ in range(4)]
    return (q, k, v, qw, kw, eps, cs, positions, slots), caches


def qk_norm_unfused(q, k, v, qw, kw, eps, cs, positions, slots, kc, vc, scales):
    """The Triton launches LlamaAttention + Attention ran before the fusion: two RMSNorms over the heads, then
    RoPE + cache write."""
    T, hd = q.shape[0], qw.shape[0]
    qn = triton_norm.rms_norm_triton(q.reshape(T, -1, hd), qw, eps)
    kn = triton_norm.rms_norm_triton(k.reshape(T, -1, hd), kw, eps)
    return triton_attention.rope_and_cache_triton(positions, qn, kn, v.view(T, -1, hd), cs, kc, vc, slots, *scales)


def qk_norm_fused(q, k, v, qw, kw, eps, cs, positions, slots, kc, vc, scales, per_program=None):
    T, hd = q.shape[0], qw.shape[0]
    return triton_rope.rope_launch(positions, q.view(T, -1, hd), k.view(T, -1, hd), cs, v.view(T, -1, hd), kc, vc,
                                   slots, *scales, qk_norm=(qw, kw, eps), q_heads_per_program=per_program)


def rope_plain(q, k, v, qw, kw, eps, cs, positions, slots, kc, vc, scales, per_program=None):
    """RoPE + cache write without q/k norms (Llama): the same launch with NORM off."""
    T, hd = q.shape[0], qw.shape[0]
    return triton_rope.rope_launch(positions, q.view(T, -1, hd), k.view(T, -1, hd), cs, v.view(T, -1, hd), kc, vc,
                                   slots, *scales, q_heads_per_program=per_program)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def qk_norm_fusion(dtype, n_layers: int, tokens=FUSION_TOKENS, device="cuda") -> list[str]:
    """q/k RMSNorm + RoPE + cache write: three launches vs one (see the module docstring). Returns the
    failures."""
    failures: list[str] = []
    timed = device == "cuda"
    shape = QWEN3_ATTN if timed else (4, 2, 32, 1e4, 1e-6)
    print(f"\n-- q/k RMSNorm + RoPE + KV-cache write ({shape[0]} q / {shape[1]} kv heads of {shape[2]}): "
          "3 launches vs 1")
    if timed:
        print(f"{'cache':>8} {'T':>3} {'bit-equal':>9} {'unfused us':>11} {'fused us':>9}  fused us by q heads a "
              "program")
    for cache_dtype, scales in ((dtype, (1.0, 1.0)), (torch.float8_e4m3fn, (0.05, 0.03))):
        for T in tokens:
            args, (kc1, vc1, kc2, vc2) = qk_norm_inputs(T, dtype, cache_dtype, device, shape)
            qu, ku = qk_norm_unfused(*args, kc1, vc1, scales)
            qf, kf = qk_norm_fused(*args, kc2, vc2, scales)
            equal = (torch.equal(qu, qf) and torch.equal(ku, kf) and torch.equal(as_bytes(kc1), as_bytes(kc2))
                     and torch.equal(as_bytes(vc1), as_bytes(vc2)))
            if not equal:
                diff = int((qu != qf).sum() + (ku != kf).sum() + (as_bytes(kc1) != as_bytes(kc2)).sum())
                failures.append(f"fused q/k norm cache {cache_dtype} T={T}: {diff} elements differ")
            tag = "fp8" if cache_dtype == torch.float8_e4m3fn else "bf16" if cache_dtype == torch.bfloat16 else "fp32"
            if not timed:
                print(f"  cache {tag} T={T}: bit-equal {equal}")
                continue
            def per_layer_us(fn, *extra, args=args, kc=kc2, vc=vc2, scales=scales) -> float:
                return median_ms(graphed(partial(fn, *args, kc, vc, scales, *extra), n_layers)) / n_layers * 1e3

            t_un, t_fu = per_layer_us(qk_norm_unfused), per_layer_us(qk_norm_fused)
            sweep = "  ".join(f"{h}: {per_layer_us(qk_norm_fused, h):.1f}" for h in (32, 16, 8, 4, 2))
            print(f"{tag:>8} {T:>3} {str(equal):>9} {t_un:>11.1f} {t_fu:>9.1f}  {sweep}")
            plain = "  ".join(f"{h}: {per_layer_us(rope_plain, h):.1f}" for h in (32, 8))
            print(f"{'':>37}  no norm (RoPE + cache only): {plain}")
    return failures


def main() -> int:
    from moe_kernel_bench import SHAPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8, help="distinct layers' weights in each timed graph")
    args = ap.parse_args()
    failures = router_fusion(SHAPES, torch.bfloat16, args.layers) + qk_norm_fusion(torch.bfloat16, args.layers)
    if failures:
        print("FAILURES:", "; ".join(failures))
        return 1
    print("\nthe fused launches agree with the launches they replace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
