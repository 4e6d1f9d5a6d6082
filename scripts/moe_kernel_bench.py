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
PAIR_GEMM = dict(GEMV=False)  # the pair-block GEMMs + slot sum, the decode path before the GEMV launches
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
        print(f"  {total:7.2f} us  kernels in all (the graph's wall time adds the gaps between them)")


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
        base = triton_moe.moe_gemv_config(H, inter, x.device)
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
        check("smoke", T, x, torch.randn(T, E), w13, w2, k, True,
              (None, PAIR_GEMM, dict(GEMV=False, PAIR_BLOCKS=False)))
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
        router_fusion(torch.bfloat16, args.layers)
        qk_norm_fusion(torch.bfloat16, args.layers)
    if failures:
        print("FAILURES:", "; ".join(failures))
        return 1
    print("\nall kernels agree with their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
