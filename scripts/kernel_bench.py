"""Time every Triton kernel against its torch reference at Llama-3.1-8B shapes, on CUDA.

    python scripts/kernel_bench.py                  # all sections, bf16
    python scripts/kernel_bench.py --only decode --sweep-splits
    TRITON_INTERPRET=1 python scripts/kernel_bench.py --smoke   # CPU: tiny shapes, logic only

Shapes: 32 query heads, 8 KV heads, head_dim 128, block_size 32 (paged, shuffled block ids),
hidden 4096, intermediate 14336. Decode: batch 1/64/256 x context 512/2048/8192; prefill: 2048
tokens (one prompt, 4 ragged prompts, and a 2048-token chunk after a 2048-token prefix).

Every row checks the kernel against the reference (decode on a subset of the batch when the
reference would not fit) and prints the median time of both (triton.testing.do_bench, L2
flushed between runs). Decode rows print achieved bandwidth: bytes of K/V read + q read +
output written, over the kernel time, as a fraction of 3.0 TB/s (the H100's measured copy
bandwidth); prefill rows print TFLOP/s of the causal attention against 790 TFLOP/s (bf16 dense
matmul). Exits 1 if any kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from rtllm.kernels import (
    activation,
    attention,
    attention_rope,
    norm,
    rope,
    triton_activation,
    triton_attention,
    triton_norm,
    triton_rope,
)

HBM_TBPS = 3.0
BF16_TFLOPS = 790.0
HQ, HKV, D, BS = 32, 8, 128, 32
HIDDEN, INTER = 4096, 14336

failures: list[str] = []


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def try_bench(fn: Callable[[], object], device: torch.device) -> float | None:
    """bench(), or None when the reference runs out of memory."""
    try:
        return bench(fn, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    diff = (actual.float() - expected.float()).abs()
    ok = bool(torch.isfinite(actual).all()) and bool((diff <= atol + rtol * expected.float().abs()).all())
    if not ok:
        failures.append(name)
    return f"{'ok' if ok else 'MISMATCH'} (max|d|={diff.max().item():.2e})"


def fmt_ms(ms: float | None) -> str:
    return f"{ms * 1e3:9.1f}us" if ms is not None else "      OOM  "


def speedup(t: float, r: float | None) -> str:
    return f"{r / t:6.2f}x" if r is not None else "    - "


def paged_cache(seq_lens: list[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """Random K/V caches holding every sequence in shuffled blocks; returns caches and tables."""
    nblocks = [-(-s // BS) for s in seq_lens]
    total = sum(nblocks)
    perm = torch.randperm(total, generator=gen).to(device=device, dtype=torch.int32)
    tables = torch.zeros((len(seq_lens), max(nblocks)), dtype=torch.int32, device=device)
    start = 0
    for b, n in enumerate(nblocks):
        tables[b, :n] = perm[start : start + n]
        start += n
    k_cache = torch.randn((total, BS, HKV, D), dtype=dtype, device=device)
    v_cache = torch.randn((total, BS, HKV, D), dtype=dtype, device=device)
    return k_cache, v_cache, tables


# -------------------------------------------------------------------------------------------


def bench_decode(device, dtype, batches, contexts, sweep: bool) -> None:
    print(f"\n== paged decode attention ({dtype}, Hq {HQ}, Hkv {HKV}, D {D}, block {BS})")
    print(
        f"{'batch':>6} {'ctx':>6} {'splits':>6} {'triton':>11} {'torch':>11} {'speedup':>7}"
        f" {'TB/s':>6} {'of 3.0':>6}  check"
    )
    gen = torch.Generator().manual_seed(0)
    cases = [(f"{B:>6} {ctx:>6}", [ctx] * B) for B in batches for ctx in contexts]
    # and a ragged batch: 64 lengths spread over 1..max context
    lens = torch.randint(1, max(contexts) + 1, (64,), generator=gen).tolist()
    cases.append((f"{'64 ragged':>13}", lens))
    for name, seq_lens in cases:
        B, max_len = len(seq_lens), max(seq_lens)
        k_cache, v_cache, tables = paged_cache(seq_lens, dtype, device, gen)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        q = torch.randn((B, HQ, D), dtype=dtype, device=device)
        k, v = (torch.randn((B, HKV, D), dtype=dtype, device=device) for _ in range(2))  # the step's own token
        sms = triton_attention.sm_count(q)
        splits, _ = triton_attention.decode_num_splits(B, HKV, max_len, 64, sms)
        args = (q, k, v, k_cache, v_cache, tables, sl, D**-0.5, max_len)
        out = triton_attention.paged_decode_attention_triton(*args)
        sub = min(B, 16)  # the reference materializes K/V per sequence: check a subset
        expected = attention.paged_decode_attention_torch(
            q[:sub], k[:sub], v[:sub], k_cache, v_cache, tables[:sub], sl[:sub], D**-0.5, max_len
        )
        verdict = check(f"decode {name.split()}", out[:sub], expected, 2e-2, 2e-2)
        t = bench(partial(triton_attention.paged_decode_attention_triton, *args), device)
        r = try_bench(partial(attention.paged_decode_attention_torch, *args), device)
        nbytes = (sum(seq_lens) * HKV * D * 2 + 2 * q.numel()) * q.element_size()
        tbps = nbytes / (t * 1e-3) / 1e12
        print(
            f"{name} {splits:>6} {fmt_ms(t)} {fmt_ms(r)} {speedup(t, r)}"
            f" {tbps:6.2f} {tbps / HBM_TBPS:6.1%}  {verdict}"
        )
        if sweep and 2 * sms > B * HKV:
            timings = []
            for s in (1, 2, 4, 8, 16, 32, 64):
                if (s - 1) * 64 >= max_len:
                    break
                fn = partial(triton_attention.paged_decode_attention_triton, *args, num_splits=s)
                timings.append(f"{s}:{bench(fn, device) * 1e3:.1f}")
            print(f"{'':>14} forced splits -> us:  {'  '.join(timings)}")
        del k_cache, v_cache, out
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_prefill(device, dtype, total: int) -> None:
    print(f"\n== paged prefill attention ({dtype}, {total} new tokens)")
    print(f"{'case':>26} {'triton':>11} {'torch':>11} {'speedup':>7} {'TFLOP/s':>8} {'of 790':>6}  check")
    gen = torch.Generator().manual_seed(1)
    cases = {
        f"1 x {total}": ([0], [total]),
        f"4 x {total // 4} ragged": ([0, 0, 0, 0], [total // 2, total // 4, total // 8, total // 8]),
        f"{total} after {total} cached": ([total], [total]),
    }
    for name, (ctx, qlens) in cases.items():
        seq_lens = [c + n for c, n in zip(ctx, qlens)]
        k_cache, v_cache, tables = paged_cache(seq_lens, dtype, device, gen)
        q = torch.randn((sum(qlens), HQ, D), dtype=dtype, device=device)
        k, v = (torch.randn((sum(qlens), HKV, D), dtype=dtype, device=device) for _ in range(2))  # the chunks' own
        qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        args = (q, k, v, k_cache, v_cache, tables, qsl, sl, D**-0.5)
        tri = partial(triton_attention.paged_prefill_attention_triton, *args, max(qlens), max(seq_lens))
        verdict = check(f"prefill {name}", tri(), attention.paged_prefill_attention_torch(*args), 2e-2, 2e-2)
        t = bench(tri, device)
        r = try_bench(partial(attention.paged_prefill_attention_torch, *args), device)
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in zip(ctx, qlens))
        tflops = 4 * pairs * D * HQ / (t * 1e-3) / 1e12
        print(
            f"{name:>26} {fmt_ms(t)} {fmt_ms(r)} {speedup(t, r)} {tflops:8.1f}"
            f" {tflops / BF16_TFLOPS:6.1%}  {verdict}"
        )


def flat(result) -> torch.Tensor:
    """A kernel's result(s) as one flat fp32 tensor."""
    parts = result if isinstance(result, tuple | list) else (result,)
    return torch.cat([p.float().flatten() for p in parts])


def compare(name: str, tri, ref, args: tuple, nbytes: int, device, outputs=None, tol: float = 2e-2) -> None:
    """Check tri(*args) against ref(*args) and print both times and tri's bandwidth.

    ``outputs(args)`` picks what to compare for kernels that write into their arguments.
    """
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    got, want = tri(*args), ref(*ref_args)
    if outputs is not None:
        got, want = outputs(args), outputs(ref_args)
    verdict = check(name, flat(got), flat(want), tol, tol)
    t = bench(partial(tri, *args), device)
    r = bench(partial(ref, *ref_args), device)
    tbps = nbytes / (t * 1e-3) / 1e12
    print(f"{name:>34} {fmt_ms(t)} {fmt_ms(r)} {speedup(t, r)} {tbps:6.2f} {tbps / HBM_TBPS:6.1%}  {verdict}")


def bench_elementwise(device, dtype, token_counts) -> None:
    print(f"\n== cache writes, RoPE, RMSNorm, SiLU-and-mul ({dtype})")
    print(f"{'kernel':>34} {'triton':>11} {'torch':>11} {'speedup':>7} {'TB/s':>6} {'of 3.0':>6}  check")
    el = torch.tensor([], dtype=dtype).element_size()
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=device).float() / D)
    f = torch.outer(torch.arange(8192, device=device).float(), inv)
    cs = torch.cat((f.cos(), f.sin()), -1)
    for T in token_counts:
        g = torch.Generator(device=device).manual_seed(T)
        qkv = torch.randn((T, HQ + 2 * HKV, D), dtype=dtype, device=device, generator=g)
        q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
        nb = T // BS + 8
        slots = torch.randperm(nb * BS, device=device, generator=g)[:T]
        kc = torch.zeros((nb, BS, HKV, D), dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        positions = torch.randint(0, 8192, (T,), device=device, generator=g)
        x = torch.randn((T, HIDDEN), dtype=dtype, device=device, generator=g)
        res = torch.randn((T, HIDDEN), dtype=dtype, device=device, generator=g)
        w = torch.randn((HIDDEN,), dtype=dtype, device=device, generator=g)
        gu = torch.randn((T, 2 * INTER), dtype=dtype, device=device, generator=g)
        kv_bytes = 4 * T * HKV * D * el
        compare(
            f"reshape_and_cache T={T}", triton_attention.reshape_and_cache_triton,
            attention.reshape_and_cache_torch, (k, v, kc, vc, slots), kv_bytes, device,
            outputs=lambda a: (a[2], a[3]), tol=0.0,
        )  # fmt: skip
        compare(
            f"apply_rope T={T}", triton_rope.apply_rope_triton, rope.apply_rope_torch,
            (positions, q, k, cs), 2 * T * (HQ + HKV) * D * el, device,
        )  # fmt: skip
        compare(
            f"rope_and_cache T={T}", triton_attention.rope_and_cache_triton, attention_rope.rope_and_cache_torch,
            (positions, q, k, v, cs, kc, vc, slots), 2 * T * (HQ + 2 * HKV) * D * el, device,
            outputs=lambda a: (a[5], a[6]),
        )  # fmt: skip
        compare(
            f"rms_norm T={T} H={HIDDEN}", triton_norm.rms_norm_triton, norm.rms_norm_torch,
            (x, w, 1e-5), 2 * T * HIDDEN * el, device,
        )  # fmt: skip
        compare(
            f"fused_add_rms_norm T={T}", triton_norm.fused_add_rms_norm_triton, norm.fused_add_rms_norm_torch,
            (x, res, w, 1e-5), 4 * T * HIDDEN * el, device,
        )  # fmt: skip
        compare(
            f"silu_and_mul T={T} I={INTER}", triton_activation.silu_and_mul_triton,
            activation.silu_and_mul_torch, (gu,), 3 * T * INTER * el, device,
        )  # fmt: skip


def main() -> int:
    global HQ, HKV, D, BS, HIDDEN, INTER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--only", choices=["decode", "prefill", "elementwise"], action="append")
    ap.add_argument("--sweep-splits", action="store_true", help="also time decode at forced split counts")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    sections = set(args.only or ["decode", "prefill", "elementwise"])
    if args.smoke:
        device = torch.device("cpu")
        HQ, HKV, D, BS, HIDDEN, INTER = 4, 2, 64, 16, 256, 384
        batches, contexts, prefill_tokens, tokens = [1, 3], [40], 64, [8]
    else:
        if not torch.cuda.is_available():
            print("kernel_bench needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
            return 2
        device = torch.device("cuda")
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
        batches, contexts, prefill_tokens, tokens = [1, 64, 256], [512, 2048, 8192], 2048, [256, 2048]
    torch.manual_seed(0)
    if "decode" in sections:
        bench_decode(device, dtype, batches, contexts, args.sweep_splits)
    if "prefill" in sections:
        bench_prefill(device, dtype, prefill_tokens)
    if "elementwise" in sections:
        bench_elementwise(device, dtype, tokens)
    if failures:
        print(f"\nMISMATCH: {', '.join(failures)}")
        return 1
    print("\nall kernels match their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
