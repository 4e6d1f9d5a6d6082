"""MoE kernels on CUDA at Qwen3-30B-A3B (128 experts, top 8, H 2048, I 768) and Mixtral-8x7B
(8 experts, top 2, H 4096, I 14336) shapes: check and time them.

    python scripts/moe_kernel_bench.py                  # both shapes, bf16
    python scripts/moe_kernel_bench.py --only qwen3 --tune   # also sweep the opt-in GEMV path's tiles
    python scripts/moe_kernel_bench.py --only qwen3 --profile   # per-kernel times of a batch-1 layer
    python scripts/moe_kernel_bench.py --fusions        # only the decode fusions, fused vs unfused (below)
    TRITON_INTERPRET=1 python scripts/moe_kernel_bench.py --smoke   # CPU: tiny shapes, logic only

Each row: T tokens through one MoE layer as the model runs it: the router GEMM, Triton routing and
the experts (alignment unless few pairs, two grouped GEMMs, the k-slot sum), checked against the
torch references (routing: the same probabilities chosen; experts: max |diff| / max |ref|) and
timed as a CUDA graph replay (how the engine runs decode), and eagerly (how it runs a prefill:
"eager" wall time, "host" the time to issue the launches; host >= eager means host-bound). The
graph runs LAYERS distinct layers' weights one after the other (time / LAYERS per layer), so that
a layer never finds its experts in L2 from the previous replay (50 MB of L2 against 75 MB of
experts at batch 1). "gemv" is the opt-in GEMV-shaped decode path (config GEMV=True), same graph.
Bandwidth: bytes of the experts the batch hits (each read once) + router + activations, over the
graph time, against the copy bandwidth measured here; FLOP/s: 2 * T * k * 3 * H * I over the
graph time. The router runs as the model runs it (rtllm.kernels.moe.route: one launch for GEMM + routing
at <= ROUTER_FUSED_MAX_TOKENS tokens).

``--fusions`` (also run after the tables unless --no-fusions) compares two decode fusions with the
launches they replace, at T = 1, 4 and 16 tokens, each timed as a graph over LAYERS layers' weights
(per-layer us):

- router: the router GEMM (cuBLAS) + fused_topk_triton vs router_topk_triton (GEMM + routing in one
  launch; a num_warps sweep); agreement over 200 random inputs: rows with the same expert ids, rows
  bit-equal in ids and weights, and the largest weight difference where the ids agree (the fused
  GEMM sums in another order than cuBLAS: a bf16 logit can round one ulp apart);
- qk norm: Qwen3-30B-A3B attention (32 q / 4 kv heads of 128), q_norm + k_norm (two RMSNorm
  launches, as LlamaAttention ran them) + RoPE / cache write vs the one fused launch, bf16 and FP8
  caches; agreement: q, k and both caches compared bit for bit.

Exits 1 if a kernel disagrees with its reference (or the fused router picks other experts than the
unfused path in more than 1% of rows, or the fused q/k norm is not bit-equal).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial

import torch
import torch.nn.functional as F

from rtllm.bench.bounds import cuda_graphed as graphed
from rtllm.bench.bounds import time_cuda
from rtllm.kernels import moe, triton_attention, triton_moe, triton_moe_routing, triton_norm, triton_rope

SHAPES = {"qwen3": (128, 8, 2048, 768, True), "mixtral": (8, 2, 4096, 14336, True)}  # E, k, H, I, renormalize
GEMV_DECODE = dict(GEMV=True)  # the opt-in decode path (GEMV-shaped launches, no sum launch), for comparison
failures: list[str] = []


def median_ms(fn, iters: int = 50) -> float:
    return time_cuda(fn, iters) * 1e3


def copy_bandwidth() -> float:
    bufs = torch.empty(2, 1 << 28, dtype=torch.bfloat16, device="cuda")
    return 2 * bufs[0].numel() * 2 / (median_ms(lambda: bufs[1].copy_(bufs[0]), 20) / 1e3)


def layers_fn(x, layers, k, renorm, config=None):
    """One MoE layer per (w13, w2, gate) in ``layers``, each as FusedMoE.forward runs it."""
    def run():
        for w13, w2, gate in layers:
            w, ids = moe.route(x, gate, k, renorm)
            triton_moe.fused_experts_triton(x, w13, w2, w, ids, config=config)
    return run


def host_and_eager_us(fn, n: int, iters: int = 10) -> tuple[float, float]:
    """Per layer, run eagerly (how the engine runs a prefill): the host's time to issue the launches
    (until fn returns) and the wall time with the GPU's work (synchronized); medians."""
    import time

    fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
    return sorted(host)[iters // 2] / n * 1e6, sorted(wall)[iters // 2] / n * 1e6


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def check(name: str, T: int, x, logits, w13, w2, k: int, renorm: bool, configs=(None,)) -> list[float]:
    w, ids = triton_moe.fused_topk_triton(logits, k, renorm)
    w_ref, ids_ref = moe.fused_topk_torch(logits, k, renorm)
    probs = torch.softmax(logits.float(), -1)
    if not torch.allclose(probs.gather(1, ids.long()), probs.gather(1, ids_ref.long()), atol=1e-6, rtol=0) or \
            not torch.allclose(w, w_ref, atol=1e-5, rtol=1e-4):
        failures.append(f"{name} T={T} routing")
    ref = moe.fused_experts_torch(x, w13, w2, w_ref, ids_ref)
    errs = []
    for cfg in configs:
        out = triton_moe.fused_experts_triton(x, w13, w2, w_ref, ids_ref, config=cfg)
        errs.append(rel_err(out, ref))
        if errs[-1] > 2e-2:
            failures.append(f"{name} T={T} experts {cfg} rel err {errs[-1]:.3g}")
    return errs


def make_layers(E, k, H, inter, dtype, n, g):
    return [(torch.randn(E, 2 * inter, H, device="cuda", dtype=dtype, generator=g) * 0.02,
             torch.randn(E, H, inter, device="cuda", dtype=dtype, generator=g) * 0.02,
             torch.randn(E, H, device="cuda", dtype=dtype, generator=g) * 0.02) for _ in range(n)]


def run_shape(name: str, tokens: list[int], bw: float, dtype: torch.dtype, n_layers: int) -> list:
    E, k, H, inter, renorm = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    n = max(1, min(n_layers, int(0.5 * torch.cuda.mem_get_info()[0] // (3 * E * H * inter * 2))))
    layers = make_layers(E, k, H, inter, dtype, n, g)
    w13, w2, gate = layers[0]
    expert_bytes = 3 * H * inter * w13.element_size()
    print(f"\n== {name}: E {E}, top-{k}, H {H}, I {inter}, {dtype}; {expert_bytes / 2**20:.1f} MiB per expert; "
          f"graph over {n} layers' weights")
    print(f"{'T':>6} {'rel err':>8} {'graph us':>9} {'gemv us':>8} {'eager us':>9} {'host us':>8} {'ref ms':>8} "
          f"{'hit':>4} {'GB/s':>7} {'of copy':>7} {'gemv':>6} {'TFLOP/s':>8}")
    rows = []
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        logits = F.linear(x, gate)
        decode = T * k * 4 <= E
        errs = check(name, T, x, logits, w13, w2, k, renorm, (None, GEMV_DECODE) if decode else (None,))
        per = median_ms(graphed(layers_fn(x, layers, k, renorm))) / n
        host, eager = host_and_eager_us(layers_fn(x, layers, k, renorm), n)
        gemv = median_ms(graphed(layers_fn(x, layers, k, renorm, GEMV_DECODE))) / n if decode else float("nan")
        w, ids = moe.fused_topk_torch(logits, k, renorm)
        ref = median_ms(partial(moe.fused_experts_torch, x, w13, w2, w, ids), 10) if T <= 2048 else float("nan")
        hit = int(torch.unique(ids).numel())
        nbytes = (hit * expert_bytes + E * H * x.element_size() + T * H * x.element_size() * (3 + k)
                  + T * k * inter * x.element_size() * 2)
        gbs = nbytes / (per / 1e3) / 1e9
        tflops = 2 * T * k * 3 * H * inter / (per / 1e3) / 1e12
        print(f"{T:>6} {max(errs):>8.1e} {per * 1e3:>9.1f} {gemv * 1e3:>8.1f} {eager:>9.1f} {host:>8.1f} {ref:>8.3f} "
              f"{hit:>4} {gbs:>7.0f} "
              f"{gbs * 1e9 / bw:>7.1%} {nbytes / (gemv / 1e3) / bw:>6.1%} {tflops:>8.1f}")
        rows.append(dict(T=T, us=per * 1e3, gemv_us=gemv * 1e3, eager_us=eager, host_us=host, hit=hit, gbs=gbs,
                         of_copy=gbs * 1e9 / bw))
    return layers, rows


def profile_layer(name, layers, dtype, T: int = 1) -> None:
    """Per-kernel GPU times of T tokens through the layers (graph replays), default and GEMV decode path."""
    from torch.profiler import ProfilerActivity, profile

    E, k, H, inter, renorm = SHAPES[name]
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    for label, cfg in (("default", None), ("gemv", GEMV_DECODE)):
        replay = graphed(layers_fn(x, layers, k, renorm, cfg))
        replay()
        torch.cuda.synchronize()
        reps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                replay()
            torch.cuda.synchronize()
        calls = reps * len(layers)
        print(f"\n-- {name} T={T} per-kernel GPU time per layer ({label} path; graph replays)")
        total = 0.0
        for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if ev.device_time_total <= 0 or ev.count < calls:
                continue
            per = ev.device_time_total / calls
            total += per
            print(f"  {per:7.2f} us  x{ev.count // calls}  {ev.key[:90]}")
        print(f"  {total:7.2f} us  kernels in all (the graph's wall time adds the gaps between them)")


def tune_decode(name, layers, bw, dtype, out_path=None, tokens=(1,)) -> None:
    """Sweep the opt-in GEMV path's tiles (graph replay per layer): gate/up tiles with the down tiles at their
    default, then the down tiles with the best gate/up tiles. ``out_path``: the best tiles at the
    first T as JSON (for RTLLM_MOE_GEMV_TILES)."""
    E, k, H, inter, renorm = SHAPES[name]
    expert_bytes = 3 * H * inter * 2
    print(f"\n-- {name} decode GEMV tile sweep (graph us per layer; best first)")
    best = None
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=dtype)
        hit = int(torch.unique(moe.fused_topk_torch(F.linear(x, layers[0][2]), k, renorm)[1]).numel())

        def sweep(cands, x=x, T=T, hit=hit):
            rows = []
            for cfg in cands:
                try:
                    t = median_ms(graphed(layers_fn(x, layers, k, renorm, cfg)), 20) / len(layers)
                except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit)
                    rows.append((float("inf"), cfg, type(e).__name__))
                    continue
                rows.append((t, cfg, ""))
            rows.sort(key=lambda r: r[0])
            for t, cfg, err in rows[:4] + rows[-1:]:
                share = hit * expert_bytes / (t / 1e3) / bw
                print(f"  T={T:<3} {t * 1e3:7.1f} us  {share:6.1%} of copy  {cfg} {err}")
            return rows[0][1]

        best1 = sweep([dict(GEMV=True, BLOCK_N1=bn, BLOCK_K1=bk, WARPS1=w, ACC2D1=a) for (bn, bk), w, a in
                       itertools.product(((8, 512), (16, 512), (16, 256), (32, 256)), (4, 8), (False, True))])
        best2 = sweep([dict(best1, BLOCK_N2=bn, BLOCK_K2=bk, WARPS2=w, ACC2D2=a) for (bn, bk), w, a in
                       itertools.product(((8, 1024), (16, 1024), (16, 512), (32, 256)), (4, 8), (False, True))])
        best = best or best2
    if out_path and best:
        import json

        with open(out_path, "w") as f:
            json.dump(best, f)
        print(f"  best tiles -> {out_path}: {json.dumps(best)}")


# --------------------------------------------------------------------------------------------
# decode fusions: fused vs unfused launches


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


def router_fusion(dtype, n_layers: int, trials: int = 200, tokens=FUSION_TOKENS, device="cuda") -> None:
    """The router GEMM + top-k, unfused vs one launch, at the MoE shapes (see the module docstring)."""
    timed = device == "cuda"
    print("\n-- router GEMM + routing: cuBLAS GEMM + fused_topk_triton vs router_topk_triton (one launch)")
    if timed:
        print(f"{'shape':>8} {'T':>3} {'same ids':>9} {'bit-eq':>7} {'max dw':>8} {'unfused us':>11} "
              f"{'fused us':>9}  fused us by num_warps")
    g = torch.Generator(device=device).manual_seed(1)
    for name, (E, k, H, _inter, renorm) in SHAPES.items():
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


def qk_norm_fusion(dtype, n_layers: int, tokens=FUSION_TOKENS, device="cuda") -> None:
    """q/k RMSNorm + RoPE + cache write: three launches vs one (see the module docstring)."""
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


def smoke() -> int:
    """CPU under TRITON_INTERPRET=1: tiny shapes through the same checks, both decode paths."""
    E, k, H, inter = 8, 2, 32, 16
    w13 = torch.randn(E, 2 * inter, H) * 0.1
    w2 = torch.randn(E, H, inter) * 0.1
    for T in (1, 5):
        x = torch.randn(T, H)
        check("smoke", T, x, torch.randn(T, E), w13, w2, k, True, (None, GEMV_DECODE, dict(PAIR_BLOCKS=False)))
    router_fusion(torch.float32, 1, trials=2, tokens=(1, 3), device="cpu")
    qk_norm_fusion(torch.float32, 1, tokens=(1, 3), device="cpu")
    print("smoke:", "FAIL " + "; ".join(failures) if failures else "ok")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--tokens", default="1,2,4,8,32,128,512,2048,8192")
    ap.add_argument("--layers", type=int, default=8, help="distinct layers' weights in each timed graph")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-out", default=None, help="write the best decode tiles (JSON) here")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--fusions", action="store_true", help="only the decode fusions' comparison")
    ap.add_argument("--no-fusions", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in [] if args.fusions else [args.only] if args.only else list(SHAPES):
        layers, _ = run_shape(name, tokens, bw, torch.bfloat16, args.layers)
        if args.profile:
            profile_layer(name, layers, torch.bfloat16)
        if args.tune:
            tune_decode(name, layers, bw, torch.bfloat16, args.tune_out)
        del layers
        torch.cuda.empty_cache()
    if not args.no_fusions:
        router_fusion(torch.bfloat16, args.layers)
        qk_norm_fusion(torch.bfloat16, args.layers)
    if failures:
        print("FAILURES:", "; ".join(failures))
        return 1
    print("\nall kernels agree with their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
