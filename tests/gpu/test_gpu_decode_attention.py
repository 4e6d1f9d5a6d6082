"""Compiled decode attention over an FP8 (e4m3) cache (skipped without CUDA): the int32-word path decodes
with inline PTX (cvt.rn.f16x2.e4m3x2), which the interpreter cannot run, so it is checked here: every e4m3
code decodes to torch's fp16 value in its place, and the kernel matches the torch reference at ragged
lengths, block-table boundaries, GQA 1/4/8 and head_dim 64/128. Also the merge in the last split in a
replayed CUDA graph, and RoPE + cache write inside the compiled kernel."""

import pytest
import torch
import triton
import triton.language as tl

from rtllm.kernels import attention as ref
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.triton_fp8 import e4m3_words_to_f16
from tests.kernels.paged import Paged
from tests.kernels.test_attention_decode_rope import bits, run_both

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = torch.float8_e4m3fn


@triton.jit
def _decode_words(w_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
    w = tl.load(w_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    x = e4m3_words_to_f16(w, True)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * (4 * C) + tl.arange(0, 4 * C)[None, :], x)


def test_e4m3_words_decode_every_code_in_place():
    codes = torch.cat([torch.arange(256), torch.arange(256).flip(0), torch.randperm(256), torch.randperm(256)])
    codes = codes.to(torch.uint8).cuda().view(16, 64)
    out = torch.empty(16, 64, dtype=torch.float16, device="cuda")
    _decode_words[(1,)](codes.view(torch.int32), out, R=16, C=16)
    expected = codes.view(FP8).to(torch.float16)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])  # exact, signed zeros too


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (32, 8, 128), (16, 2, 128)])
@pytest.mark.parametrize("page", [16, 32])
def test_decode_fp8_words_matches_reference(hq, hkv, d, page):
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 2, page, page + 1, 63, 64, 65, 2 * page + 7, 300, 511]
    B = len(lens)
    nblocks = [-(-n // page) for n in lens]
    ids = torch.randperm(sum(nblocks) + 2, generator=g, device="cuda").to(torch.int32)
    tables = torch.zeros(B, max(nblocks) + 1, dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(nblocks):
        tables[b, :n] = ids[start : start + n]
        start += n
    nb = sum(nblocks) + 2
    k_cache = (torch.randn(nb, page, hkv, d, generator=g, device="cuda") * 3).to(FP8)
    v_cache = (torch.randn(nb, page, hkv, d, generator=g, device="cuda") * 3).to(FP8)
    q = torch.randn(B, hq, d, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(B, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(B, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    args = (q, k, v, k_cache, v_cache, tables, seq_lens, d**-0.5, max(lens))
    expected = ref.paged_decode_attention_torch(*args, None, 0.05, 0.02).float()
    bytes_ = tri.paged_decode_attention_triton(*args, k_scale=0.05, v_scale=0.02, fp8_words=False)
    for kw in ({}, {"num_splits": 1}, {"num_splits": 5}, {"prefetch": 2, "block_n": 32}, {"block_n": 32}):
        out = tri.paged_decode_attention_triton(*args, k_scale=0.05, v_scale=0.02, **kw)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        if not kw:  # same values into the same fp16 dots as the byte tiles: fp32 summation order at most
            torch.testing.assert_close(out.float(), bytes_.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 4)])  # Llama-3.1-8B, Qwen3-30B-A3B
def test_decode_merge_in_last_split_in_a_replayed_graph(hq, hkv):
    """The splits merged by the last one to finish (arrival counters), compiled: 24 layers' launches back to
    back in one CUDA graph, replayed three times, each equal to the merge launch's output (the same partials;
    fp32 sums in another order) and to the torch reference, at batch 1-4 and contexts around the tile."""
    d, page = 128, 16
    g = torch.Generator(device="cuda").manual_seed(1)
    lens = [390, 1, 65, 200]
    B, nb = len(lens), 4 * 512 // page
    tables = torch.randperm(nb, generator=g, device="cuda").to(torch.int32).view(B, -1)
    caches = [(torch.randn(nb, page, hkv, d, generator=g, device="cuda").to(torch.bfloat16),
               torch.randn(nb, page, hkv, d, generator=g, device="cuda").to(torch.bfloat16)) for _ in range(24)]
    q = torch.randn(B, hq, d, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(B, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(B, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    for b in (1, B):
        seq_lens = torch.tensor(lens[:b], dtype=torch.int32, device="cuda")
        args = [(q[:b], k[:b], v[:b], kc, vc, tables[:b], seq_lens, d**-0.5, 512) for kc, vc in caches]
        launch = [tri.paged_decode_attention_triton(*a, merge="launch") for a in args]
        [tri.paged_decode_attention_triton(*a, merge="last_split") for a in args]  # compile, counters: not captured
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [tri.paged_decode_attention_triton(*a, merge="last_split") for a in args]
        for _ in range(3):
            for o in outs:
                o.zero_()
            graph.replay()
            torch.cuda.synchronize()
            for o, want in zip(outs, launch):
                torch.testing.assert_close(o.float(), want.float(), atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(outs[-1].float(), ref.paged_decode_attention_torch(*args[-1]).float(),
                                       atol=2e-2, rtol=2e-2)


def _to_cuda(p: Paged) -> Paged:
    for name in ("q", "k_cache", "v_cache", "block_tables", "seq_lens_t"):
        setattr(p, name, getattr(p, name).cuda())
    p.k, p.v = [k.cuda() for k in p.k], [v.cuda() for v in p.v]
    return p


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("merge", ["launch", "last_split"])
def test_decode_rope_in_the_kernel_compiled(norm, cache, merge):
    """RoPE (and Qwen3's q/k norms) and the cache write inside the compiled decode kernel against
    rope_and_cache then the decode kernel (Llama-3.1-8B heads, contexts 1-401). Without the norms: the same
    bits in the caches and the output (the rotation's products and sums are explicit round-to-nearest
    operations, the attention math is the same code with the same FMA fusion). With them the key's sum of
    squares may be reduced in another order (decode_rope's docstring): caches and output within a bf16 ulp."""
    p = _to_cuda(Paged([0, 14, 400, 3], [1] * 4, 32, 8, 128, 16, torch.bfloat16, seed=5))
    p.poison_new_slots()
    a, b = run_both(p, torch.bfloat16, 128, norm, cache, merge=merge)
    if not norm:
        for x, y in zip(a, b):
            assert torch.equal(bits(x), bits(y))
        return
    for x, y in zip(a[1:], b[1:]):  # the caches (e4m3 bytes: one code apart at most)
        if x.dtype == torch.float8_e4m3fn:
            assert (bits(x).int() - bits(y).int()).abs().max() <= 1
        else:
            torch.testing.assert_close(x.float(), y.float(), atol=0, rtol=2**-7, equal_nan=True)
    torch.testing.assert_close(b[0].float(), a[0].float(), atol=1e-2, rtol=1e-2)
