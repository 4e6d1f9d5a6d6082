"""Per-kernel GPU time by category from a torch.profiler run, shared by the profiling scripts
(scripts/moe_engine_profile.py, scripts/step_profile.py)."""

from __future__ import annotations

CATS = [  # (category, substrings of a kernel name), first match wins
    ("moe gemv", ("_moe_gemv",)), ("moe gemm", ("_moe_gemm",)), ("moe topk", ("_topk_softmax",)),
    ("moe sum", ("_moe_slot_sum", "reduce_kernel")), ("attention", ("_decode", "_prefill", "attn", "_reduce")),
    ("rope/cache", ("rope", "cache")), ("fp8 quant", ("quant_kernel",)), ("norm", ("rms", "norm")), ("silu", ("silu",)),
    ("dense gemm", ("gemm", "nvjet", "sm90", "cutlass", "cublas", "gemv")), ("sampling", ("sampl", "argmax", "topk")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATS:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def kernel_table(prof, calls: int, path: str, title: str) -> None:
    rows = [(ev.device_time_total / calls, ev.count / calls, ev.key) for ev in prof.key_averages()
            if ev.device_time_total > 0]
    rows.sort(key=lambda r: -r[0])
    by_cat: dict[str, float] = {}
    for us, _, key in rows:
        by_cat[category(key)] = by_cat.get(category(key), 0.0) + us
    total = sum(by_cat.values())
    if not total:
        print(f"-- {title}: no device kernels recorded")
        return
    print(f"-- {title}: {total / 1e3:.3f} ms of kernels per call")
    for cat, us in sorted(by_cat.items(), key=lambda r: -r[1]):
        print(f"   {cat:<12} {us / 1e3:8.3f} ms  {us / total:6.1%}")
    with open(path, "w") as f:
        f.write(f"{title}\nus/call  launches/call  kernel\n")
        for us, n, key in rows:
            f.write(f"{us:10.1f} {n:6.1f}  {key}\n")
    for us, n, key in rows[:8]:
        print(f"   {us:9.1f} us x{n:<5.0f} {key[:80]}")
