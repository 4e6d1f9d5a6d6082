"""Paged attention with a bf16 cache vs an FP8 (e4m3) cache, at the Llama-3.1-8B shape (32 q heads,
8 KV heads, head_dim 128, the engine's 32-token blocks), on the GPU:

- prefill: 64 new 128-token prompts (8,192 tokens, no cached prefix), the ISL-128 workload's prefill;
- chunk: one 2,048-token chunk after a 2,048-token cached prefix (chunked prefill, prefix hit);
- decode: 512 sequences of 128-255 tokens (mean ~190), the decode step at concurrency 512.

Each case runs the Triton kernel on a bf16 cache, on an FP8 cache (prefix dots in fp16, the default),
and on the FP8 cache with the prefix dots in bf16 (``cache_dot=torch.bfloat16``: each e4m3 element
converted twice, as every tile was before the fp16 path). The step's own K/V are always fresh bf16
tensors (a prompt's own prefill reads no cache; a decode's own token is read from k, v). Every
output is checked against the torch reference on the same inputs (bf16 tolerance); the FP8 outputs'
distance to the bf16 cache's is printed (the quantization error). Times: CUDA-graph replays of 20
calls, median of 5 (launch overhead as in the engine's graphs); decode also as bandwidth (cache
bytes read / time).

Usage (repo root, after ``source scripts/gpu_env.sh``): python3 scripts/fp8_kv_attention_bench.py [--sweep]
[--decode-only] (--sweep: also time the decode kernel, FP8 and bf16 caches, over prefetch / BLOCK_N / warps /
stages / register caps at the decode batch; --decode-only: skip the two prefill cases)
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from rtllm.bench.bounds import cuda_graphed, time_cuda
from rtllm.kernels import attention as ref
from rtllm.kernels import triton_attention as tri

HQ, HKV, D, PAGE = 32, 8, 128, 32
FP8 = torch.float8_e4m3fn
DEV = "cuda"


def graph_us(fn, calls: int = 20) -> float:
    return time_cuda(cuda_graphed(fn, calls), iters=5) * 1e6 / calls


class Batch:
    """Sequences with ``ctx`` cached tokens and ``new`` tokens this step: a bf16 paged cache holding all of
    them (the new ones too, as rope_and_cache leaves it), its FP8 copy (scale 1.0, the engine's static
    default), q and the fresh k, v (v a strided view of a fused qkv buffer, as in the engine)."""

    def __init__(self, ctx: list[int], new: list[int], seed: int = 0) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        dev = torch.device(DEV)
        self.ctx, self.new = ctx, new
        self.seq_lens_list = [c + n for c, n in zip(ctx, new)]
        nblocks = [-(-s // PAGE) for s in self.seq_lens_list]
        total = sum(nblocks) + 1
        ids = torch.randperm(total - 1, generator=g, device=dev).to(torch.int32) + 1  # block 0: null
        width = max(nblocks)
        self.block_tables = torch.zeros(len(new), width, dtype=torch.int32, device=dev)
        start = 0
        for b, n in enumerate(nblocks):
            self.block_tables[b, :n] = ids[start : start + n]
            start += n
        self.seq_lens = torch.tensor(self.seq_lens_list, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32,
                                            device=dev)
        T = sum(new)
        qkv = torch.randn(T, HQ + 2 * HKV, D, generator=g, device=dev, dtype=torch.bfloat16)
        self.q = qkv[:, :HQ]
        self.k = qkv[:, HQ : HQ + HKV].contiguous()  # rope_and_cache returns a new rotated k
        self.v = qkv[:, HQ + HKV :]
        self.k_cache = torch.randn(total, PAGE, HKV, D, generator=g, device=dev, dtype=torch.bfloat16)
        self.v_cache = torch.randn(total, PAGE, HKV, D, generator=g, device=dev, dtype=torch.bfloat16)
        slots = torch.cat([self._slots(b, c, s) for b, (c, s) in enumerate(zip(ctx, self.seq_lens_list))])
        tri.reshape_and_cache_triton(self.k, self.v, self.k_cache, self.v_cache, slots)
        self.k8 = torch.empty(self.k_cache.shape, dtype=FP8, device=dev)
        self.v8 = torch.empty_like(self.k8)
        every = torch.arange(total * PAGE, device=dev)
        tri.reshape_and_cache_triton(self.k_cache.view(-1, HKV, D), self.v_cache.view(-1, HKV, D),
                                     self.k8, self.v8, every)
        self.scale = D**-0.5

    def _slots(self, b: int, lo: int, hi: int) -> torch.Tensor:
        pos = torch.arange(lo, hi, device=self.block_tables.device)
        return self.block_tables[b, pos // PAGE].long() * PAGE + pos % PAGE

    def caches(self):
        return {"bf16": (self.k_cache, self.v_cache, None), "fp8": (self.k8, self.v8, None),
                "fp8 bf16-dots": (self.k8, self.v8, torch.bfloat16)}


def check(name: str, out: torch.Tensor, expected: torch.Tensor) -> str:
    bad = not torch.allclose(out.float(), expected.float(), atol=3e-2, rtol=3e-2) or out.isnan().any()
    err = (out.float() - expected.float()).abs().max().item()
    print(f"  {name:>14}: vs torch reference max |diff| {err:.2e} {'MISMATCH' if bad else 'ok'}")
    return "MISMATCH" if bad else "ok"


def prefill_case(label: str, ctx: list[int], new: list[int]) -> bool:
    p = Batch(ctx, new)
    print(f"== {label}: {len(new)} sequence(s), {sum(new)} new tokens, cached prefix {ctx[0]}")
    times, outs, ok = {}, {}, True
    for name, (kc, vc, dot) in p.caches().items():
        args = (p.q, p.k, p.v, kc, vc, p.block_tables, p.query_start_loc, p.seq_lens, p.scale)
        fn = partial(tri.paged_prefill_attention_triton, *args, max(new), max(p.seq_lens_list), cache_dot=dot)
        outs[name] = fn()
        ok &= check(name, outs[name], ref.paged_prefill_attention_torch(*args)) == "ok"
        times[name] = graph_us(fn)
    report(times, outs, flops=prefill_flops(ctx, new))
    return ok


def decode_case(label: str, lens: list[int]) -> bool:
    p = Batch([n - 1 for n in lens], [1] * len(lens), seed=1)
    print(f"== {label}: {len(lens)} sequences of {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    times, outs, ok = {}, {}, True
    cached = sum(n - 1 for n in lens) * HKV * D * 2  # K and V elements read from the cache
    for name, (kc, vc, dot) in p.caches().items():
        args = (p.q, p.k, p.v, kc, vc, p.block_tables, p.seq_lens, p.scale, max(lens))
        fn = partial(tri.paged_decode_attention_triton, *args, cache_dot=dot)
        outs[name] = fn()
        ok &= check(name, outs[name], ref.paged_decode_attention_torch(*args)) == "ok"
        times[name] = graph_us(fn)
    byte = {"bf16": 2, "fp8": 1, "fp8 bf16-dots": 1}
    report(times, outs, bandwidth={k: cached * byte[k] / (t * 1e-6) / 1e12 for k, t in times.items()})
    return ok


# (prefetch, BLOCK_N, warps, stages, register cap, words): prefetch 0 is Triton's pipeliner (stages > 1), 1 / 2
# the kernel's own register prefetch of that many tiles ahead (stages 1); words: the e4m3 cache read as int32
# words, decoded by cvt.rn.f16x2.e4m3x2 on their halves
SWEEP_FP8 = [
    (0, 32, 4, 3, None, False), (0, 64, 4, 3, None, True), (0, 64, 4, 2, None, True), (0, 64, 4, 2, 96, True),
    (0, 64, 2, 3, None, True), (0, 64, 2, 2, None, True), (0, 32, 2, 3, None, True), (0, 32, 2, 2, None, True),
]
SWEEP_BF16 = [(0, 64, 4, 3, None, False)]
# other batches (sequences, tokens): the split path (few sequences) and long sequences at one split
SHAPES = [(4, 4096), (32, 1024), (128, 512)]


def decode_shapes() -> None:
    """Defaults beside the FP8 cache's byte tiles (the default before e4m3 words) and the 2-warp words tiles at
    other batch shapes (lengths uniform in [tokens / 2, tokens])."""
    g = torch.Generator().manual_seed(3)
    for batch, tokens in SHAPES:
        lens = torch.randint(tokens // 2, tokens + 1, (batch,), generator=g).tolist()
        p = Batch([n - 1 for n in lens], [1] * len(lens), seed=2)
        args = (p.q, p.k, p.v, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale, max(lens))
        args8 = (p.q, p.k, p.v, p.k8, p.v8, p.block_tables, p.seq_lens, p.scale, max(lens))
        expected = ref.paged_decode_attention_torch(*args8)
        cases = {"bf16 default": partial(tri.paged_decode_attention_triton, *args),
                 "fp8 default": partial(tri.paged_decode_attention_triton, *args8),
                 "fp8 bytes (32, 4w, 3s)": partial(tri.paged_decode_attention_triton, *args8, fp8_words=False),
                 "fp8 words (64, 2w, 3s)": partial(tri.paged_decode_attention_triton, *args8, block_n=64,
                                                   num_warps=2, num_stages=3)}
        res = []
        for name, fn in cases.items():
            ok = name.startswith("bf16") or torch.allclose(fn().float(), expected.float(), atol=3e-2, rtol=3e-2)
            res.append(f"{name} {graph_us(fn):.1f}{'' if ok else ' MISMATCH'}")
        print(f"== decode {batch} x {min(lens)}-{max(lens)} tokens, us: " + ", ".join(res))


def decode_sweep(lens: list[int]) -> None:
    """The decode kernel's launch parameters at this batch, FP8 then bf16 cache: (prefetch, BLOCK_N, warps,
    stages, register cap, words) -> us (each output checked against the torch reference)."""
    p = Batch([n - 1 for n in lens], [1] * len(lens), seed=1)
    cached = sum(n - 1 for n in lens) * HKV * D * 2
    args = (p.q, p.k, p.v, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale, max(lens))
    base = graph_us(partial(tri.paged_decode_attention_triton, *args))
    print(f"== decode sweep, {len(lens)} sequences (bf16 cache at its defaults: {base:.1f} us)")
    args8 = (p.q, p.k, p.v, p.k8, p.v8, p.block_tables, p.seq_lens, p.scale, max(lens))
    for name, a, byte, grid in (("fp8", args8, 1, SWEEP_FP8), ("bf16", args, 2, SWEEP_BF16)):
        expected = ref.paged_decode_attention_torch(*a)
        for pf, bn, warps, stages, regs, words in grid:
            fn = partial(tri.paged_decode_attention_triton, *a, block_n=bn, num_warps=warps, num_stages=stages,
                         prefetch=pf, max_regs=regs, fp8_words=words)
            label = (f"{name:>4} prefetch {pf} block_n {bn:3d} warps {warps} stages {stages} regs {regs or '-':>3}"
                     f"{' words' if words else ''}")
            try:
                ok = torch.allclose(fn().float(), expected.float(), atol=3e-2, rtol=3e-2)
                t = graph_us(fn)
            except Exception as e:  # noqa: BLE001 - out of shared memory / registers
                print(f"  {label}: failed ({type(e).__name__})")
                continue
            print(f"  {label}: {t:7.1f} us  {cached * byte / (t * 1e-6) / 1e12:.2f} TB/s of cache  "
                  f"{t / base:.2f}x bf16 default{'' if ok else '  MISMATCH'}")


def prefill_flops(ctx: list[int], new: list[int]) -> float:
    """QK^T and PV multiply-adds x 2 over the causal (query, key) pairs."""
    pairs = sum(n * c + n * (n + 1) / 2 for c, n in zip(ctx, new))
    return 4 * pairs * HQ * D


def report(times: dict, outs: dict, flops: float | None = None, bandwidth: dict | None = None) -> None:
    base = times["bf16"]
    for name, t in times.items():
        extra = f", {flops / (t * 1e-6) / 1e12:.0f} TFLOP/s" if flops else ""
        extra += f", {bandwidth[name]:.2f} TB/s of cache" if bandwidth else ""
        dist = "" if name == "bf16" else (
            f", vs bf16 cache max |diff| {(outs[name].float() - outs['bf16'].float()).abs().max().item():.2e}")
        print(f"  {name:>14}: {t:8.1f} us  ({t / base:.2f}x the bf16 cache's time{extra}{dist})")


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    ok = True
    if "--decode-only" not in sys.argv:
        ok &= prefill_case("prefill (ISL 128)", [0] * 64, [128] * 64)
        ok &= prefill_case("chunked prefill", [2048], [2048])
    g = torch.Generator().manual_seed(2)
    lens = torch.randint(128, 256, (512,), generator=g).tolist()
    ok &= decode_case("decode (c512)", lens)
    if "--sweep" in sys.argv:
        decode_sweep(lens)
        decode_shapes()
    print("all outputs agree with the torch reference" if ok else "SOME OUTPUTS DISAGREE")


if __name__ == "__main__":
    main()
