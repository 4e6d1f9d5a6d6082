"""MoE kernels on CUDA at Qwen3-30B-A3B (128 experts, top 8, H 2048, I 768) and Mixtral-8x7B
(8 experts, top 2, H 4096, I 14336) shapes: check and time them.

    python scripts/moe_kernel_bench.py                  # both shapes, bf16
    python scripts/moe_kernel_bench.py --only qwen3 --decode   # also the decode experts alone, per path
    python scripts/moe_kernel_bench.py --only qwen3 --tune   # ... and the decode launches' tiles swept
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
experts at batch 1). The default path at decode (T * k <= E / 4) is the GEMV-shaped launches; "gemm"
is the pair-block GEMMs they replaced there (config GEMV=False), same graph.
Bandwidth: bytes of the experts the batch hits (each read once) + router + activations, over the
graph time, against the copy bandwidth measured here; FLOP/s: 2 * T * k * 3 * H * I over the
graph time. The router runs as the model runs it (rtllm.kernels.moe.route: one launch for GEMM + routing
at <= ROUTER_FUSED_MAX_TOKENS tokens).

``--decode`` (and ``--tune``) first times the experts alone at 1, 2 and 4 tokens (--decode-tokens),
routing precomputed per layer: the pair-block GEMMs, the GEMV launches, and those without PDL, as
us per layer and TB/s over the bytes of the experts hit (what the decode step spends on them);
``--tune`` adds the GEMV launches' tile sweep (gate/up tiles, then down tiles with the best gate/up).

``--fusions`` (also run after the tables unless --no-fusions): two decode fusions against the
launches they replace (scripts/moe_fusion_bench.py).

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
from moe_fusion_bench import median_ms, qk_norm_fusion, router_fusion

from rtllm.bench.bounds import cuda_graphed as graphed
from rtllm.kernels import moe, triton_moe, triton_moe_gemv

SHAPES = {"qwen3": (128, 8, 2048, 768, True), "mixtral": (8, 2, 4096, 14336, True)}  # E, k, H, I, renormalize
PAIR_GEMM = dict(GEMV=False)  # the pair-block GEMMs + slot sum, the decode path before the GEMV launches
failures: list[str] = []


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


def run_shape(name: str, tokens: list[int], bw: float, dtype: torch.dtype, n_layers: int,
              decode_tokens: tuple[int, ...] = (), tune: bool = False) -> list:
    """The table of whole layers (router + experts) per token count; first, for ``decode_tokens``, the
    decode experts alone per path (decode_experts)."""
    E, k, H, inter, renorm = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    n = max(1, min(n_layers, int(0.5 * torch.cuda.mem_get_info()[0] // (3 * E * H * inter * 2))))
    layers = make_layers(E, k, H, inter, dtype, n, g)
    w13, w2, gate = layers[0]
    expert_bytes = 3 * H * inter * w13.element_size()
    print(f"\n== {name}: E {E}, top-{k}, H {H}, I {inter}, {dtype}; {expert_bytes / 2**20:.1f} MiB per expert; "
          f"graph over {n} layers' weights")
    if decode_tokens:
        decode_experts(name, layers, bw, dtype, decode_tokens, tune)
    print(f"{'T':>6} {'rel err':>8} {'graph us':>9} {'gemm us':>8} {'eager us':>9} {'host us':>8} {'ref ms':>8} "
          f"{'hit':>4} {'GB/s':>7} {'of copy':>7} {'gemm':>6} {'TFLOP/s':>8}")
    rows = []
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        logits = F.linear(x, gate)
        decode = T * k * 4 <= E
        errs = check(name, T, x, logits, w13, w2, k, renorm, (None, PAIR_GEMM) if decode else (None,))
        per = median_ms(graphed(layers_fn(x, layers, k, renorm))) / n
        host, eager = host_and_eager_us(layers_fn(x, layers, k, renorm), n)
        gemm = median_ms(graphed(layers_fn(x, layers, k, renorm, PAIR_GEMM))) / n if decode else float("nan")
        w, ids = moe.fused_topk_torch(logits, k, renorm)
        ref = median_ms(partial(moe.fused_experts_torch, x, w13, w2, w, ids), 10) if T <= 2048 else float("nan")
        hit = int(torch.unique(ids).numel())
        nbytes = (hit * expert_bytes + E * H * x.element_size() + T * H * x.element_size() * (3 + k)
                  + T * k * inter * x.element_size() * 2)
        gbs = nbytes / (per / 1e3) / 1e9
        tflops = 2 * T * k * 3 * H * inter / (per / 1e3) / 1e12
        print(f"{T:>6} {max(errs):>8.1e} {per * 1e3:>9.1f} {gemm * 1e3:>8.1f} {eager:>9.1f} {host:>8.1f} {ref:>8.3f} "
              f"{hit:>4} {gbs:>7.0f} "
              f"{gbs * 1e9 / bw:>7.1%} {nbytes / (gemm / 1e3) / bw:>6.1%} {tflops:>8.1f}")
        rows.append(dict(T=T, us=per * 1e3, gemm_us=gemm * 1e3, eager_us=eager, host_us=host, hit=hit, gbs=gbs,
                         of_copy=gbs * 1e9 / bw))
    return layers, rows


def profile_layer(name, layers, dtype, T: int = 1) -> None:
    """Per-kernel GPU times of T tokens through the layers (graph replays): the default path (with and
    without PDL) and the pair-block GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    E, k, H, inter, renorm = SHAPES[name]
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    for label, cfg in (("default", None), ("default, no PDL", dict(PDL=False)), ("pair-block GEMMs", PAIR_GEMM)):
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
        print(f"  {total:7.2f} us  kernels in all (the graph's wall time adds the gaps between them); graph "
              f"{median_ms(replay) / len(layers) * 1e3:.2f} us a layer")
    for fn in (triton_moe_gemv._moe_gemv_gate_up_kernel, triton_moe_gemv._moe_gemv_down_kernel):
        for cache in fn.device_caches.values():
            for key, kernel in cache[0].items():
                print(f"  {fn.fn.__name__}: regs {getattr(kernel, 'n_regs', '?')}, spills "
                      f"{getattr(kernel, 'n_spills', '?')}  ({str(key)[:60]})")


def experts_fn(x, layers, routes, config=None):
    """The experts alone (routing precomputed per layer): the launches the decode step spends on them."""
    def run():
        for (w13, w2, _gate), (w, ids) in zip(layers, routes):
            triton_moe.fused_experts_triton(x, w13, w2, w, ids, config=config)
    return run


def experts_us(x, layers, routes, config, iters: int = 30) -> float:
    """Graph time per layer (us) of the experts alone, or inf if the configuration fails to compile or run."""
    try:
        return median_ms(graphed(experts_fn(x, layers, routes, config)), iters) / len(layers) * 1e3
    except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit; a launch a graph refuses)
        print(f"  {config}: {type(e).__name__}: {str(e)[:160]}")
        return float("inf")


DECODE_PATHS = {"pair-block GEMMs + sum (before)": PAIR_GEMM, "gemv (default)": dict(GEMV=True),
                "gemv, no PDL": dict(GEMV=True, PDL=False)}


def decode_experts(name, layers, bw, dtype, tokens=(1, 2, 4), tune=False) -> None:
    """The decode experts alone, per path (and with ``tune`` the GEMV tiles swept): graph us per layer,
    and the bandwidth over the bytes of the experts the tokens hit (each read once)."""
    E, k, H, inter, renorm = SHAPES[name]
    expert_bytes = 3 * H * inter * 2
    print(f"\n-- {name} decode experts alone (routing precomputed; graph us per layer over {len(layers)} layers)")
    print(f"{'T':>3} {'path':<34} {'us':>7} {'MB':>6} {'TB/s':>6} {'of copy':>7}  rel err")
    g = torch.Generator(device="cuda").manual_seed(2)
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        routes = [moe.fused_topk_torch(F.linear(x, gate), k, renorm) for _w13, _w2, gate in layers]
        hit = sum(int(torch.unique(ids).numel()) for _w, ids in routes) / len(routes)
        mb = hit * expert_bytes / 1e6
        w13, w2, _ = layers[0]
        ref = moe.fused_experts_torch(x, w13, w2, *routes[0])

        def row(label, cfg, T=T, x=x, routes=routes, mb=mb, ref=ref, w13=w13, w2=w2):
            try:
                err = rel_err(triton_moe.fused_experts_triton(x, w13, w2, *routes[0], config=cfg), ref)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit)
                print(f"{T:>3} {label:<34} {type(e).__name__}: {str(e)[:160]}")
                return float("inf")
            if err > 2e-2:
                failures.append(f"{name} T={T} decode experts {cfg} rel err {err:.3g}")
            us = experts_us(x, layers, routes, cfg)
            print(f"{T:>3} {label:<34} {us:>7.1f} {mb:>6.1f} {mb / us:>6.2f} {mb * 1e12 / us / bw:>7.1%}  {err:.1e}")
            return us

        for label, cfg in DECODE_PATHS.items():
            row(label, cfg)
        if not tune:
            continue
        base = triton_moe_gemv.moe_gemv_config(H, inter, x.device)
        gate_up = [dict(GEMV=True, BLOCK_N1=bn, BLOCK_K1=bk, WARPS1=w) for (bn, bk), w in
                   itertools.product(((8, 256), (16, 256), (32, 256), (16, 128), (32, 128), (64, 128), (8, 512)),
                                     (4, 8))]
        res = sorted((row(f"up {c['BLOCK_N1']}x{c['BLOCK_K1']} w{c['WARPS1']}", c), i) for i, c in enumerate(gate_up))
        best1 = gate_up[res[0][1]]
        down = [dict(best1, BLOCK_N2=bn, BLOCK_K2=bk, WARPS2=w) for (bn, bk), w in
                itertools.product(((2, 256), (4, 256), (8, 256), (4, 128), (8, 128), (16, 128)), (4, 8))]
        res = sorted((row(f"down {c['BLOCK_N2']}x{c['BLOCK_K2']} w{c['WARPS2']}", c), i) for i, c in enumerate(down))
        print(f"  T={T} default {base}; best {down[res[0][1]]} ({res[0][0]:.1f} us)")


# --------------------------------------------------------------------------------------------
# decode fusions: fused vs unfused launches


def smoke() -> int:
    """CPU under TRITON_INTERPRET=1: tiny shapes through the same checks, both decode paths."""
    E, k, H, inter = 8, 2, 32, 16
    w13 = torch.randn(E, 2 * inter, H) * 0.1
    w2 = torch.randn(E, H, inter) * 0.1
    for T in (1, 5):
        x = torch.randn(T, H)
        check("smoke", T, x, torch.randn(T, E), w13, w2, k, True,
              (None, PAIR_GEMM, dict(GEMV=False, PAIR_BLOCKS=False)))
    failures.extend(router_fusion(SHAPES, torch.float32, 1, trials=2, tokens=(1, 3), device="cpu"))
    failures.extend(qk_norm_fusion(torch.float32, 1, tokens=(1, 3), device="cpu"))
    print("smoke:", "FAIL " + "; ".join(failures) if failures else "ok")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--tokens", default="1,2,4,8,32,128,512,2048,8192")
    ap.add_argument("--layers", type=int, default=8, help="distinct layers' weights in each timed graph")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--decode", action="store_true", help="the decode experts alone, per path")
    ap.add_argument("--decode-tokens", default="1,2,4")
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
        decode_tokens = tuple(int(t) for t in args.decode_tokens.split(",")) if args.decode or args.tune else ()
        layers, _ = run_shape(name, tokens, bw, torch.bfloat16, args.layers, decode_tokens, args.tune)
        if args.profile:
            profile_layer(name, layers, torch.bfloat16)
        del layers
        torch.cuda.empty_cache()
    if not args.no_fusions:
        failures.extend(router_fusion(SHAPES, torch.bfloat16, args.layers))
        failures.extend(qk_norm_fusion(torch.bfloat16, args.layers))
    if failures:
        print("FAILURES:", "; ".join(failures))
        return 1
    print("\nall kernels agree with their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
