"""FP8 (e4m3fn) KV cache: the writes round exactly like torch, the Triton attention kernels read
the cache like the torch references, and the references match a dense fp64 oracle whose K/V are
the dequantized cache (fp8 value * scale) for the cached prefix and the fresh K/V for the step's own
tokens (a prefill chunk's, a decode's one token), which the kernels never read back from the cache."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from rtllm.kernels import attention as ref
from rtllm.kernels import attention_rope
from rtllm.kernels import triton_attention as tri
from rtllm.kernels.triton_fp8 import e4m3_words_to_f16
from tests.kernels.paged import BS, HEADS, NAN, Paged, close, rope_cache_case
from tests.kernels.test_norm_act_rope import cos_sin

FP8 = torch.float8_e4m3fn
SCALES = [(1.0, 1.0), (0.05, 0.02)]  # the static default and calibrated-like scales


def fp8_paged(ctx, q_lens, hq, hkv, d, bs, dtype, k_scale, v_scale, seed=0) -> Paged:
    """A Paged batch whose cache is FP8 (written by the reference with the scales) and whose new
    tokens' slots hold e4m3 NaN. Its dense K/V (the oracle's) become what attention should see: the
    cached prefix as e4m3 value * scale, the new tokens as they are."""
    p = Paged(ctx, q_lens, hq, hkv, d, bs, dtype, seed=seed)
    p.k_cache = torch.full(p.k_cache.shape, NAN, dtype=FP8)
    p.v_cache = torch.full(p.v_cache.shape, NAN, dtype=FP8)
    ref.reshape_and_cache_torch(torch.cat(p.k), torch.cat(p.v), p.k_cache, p.v_cache, p.all_slots, k_scale, v_scale)
    p.poison_new_slots()

    def seen(x, scale, c):
        return torch.cat((ref.dequantize_kv(ref.quantize_kv(x[:c], scale), scale, x.dtype), x[c:]))

    p.k = [seen(k, k_scale, c) for k, c in zip(p.k, ctx)]
    p.v = [seen(v, v_scale, c) for v, c in zip(p.v, ctx)]
    p.k_scale, p.v_scale = k_scale, v_scale
    return p


def test_quantize_kv_rounds_like_torch() -> None:
    """Saturation, ties (to even), subnormals, signed zero; the Triton writes give the same bytes."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    e4m3 = e4m3[e4m3.isfinite()].unique()
    mids = (e4m3[1:] + e4m3[:-1]) / 2  # exact ties
    vals = torch.cat([e4m3, mids, mids + 1e-6, mids - 1e-6, torch.tensor([-0.0, 500.0, -1e4, 449.0, 2e-4, -1e-9])])
    ref_bits = vals.clamp(-448, 448).to(FP8).view(torch.uint8)
    assert torch.equal(ref.quantize_kv(vals, 1.0).view(torch.uint8), ref_bits)
    n = vals.numel() // 4 * 4
    k = vals[:n].reshape(-1, 2, 2)
    kc = torch.zeros(k.shape[0], 1, 2, 2, dtype=FP8)
    vc = torch.zeros_like(kc)
    tri.reshape_and_cache_triton(k, k * 4, kc, vc, torch.arange(k.shape[0]), 1.0, 4.0)
    assert torch.equal(kc.view(torch.uint8).flatten(), ref_bits[:n])
    assert torch.equal(vc.view(torch.uint8).flatten(), ref.quantize_kv(k * 4, 4.0).view(torch.uint8).flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_reshape_and_cache_fp8(dtype, k_scale, v_scale) -> None:
    g = torch.Generator().manual_seed(6)
    T, H, D, bs, nb = 11, 4, 64, 8, 6
    kv = (torch.randn(T, 2 * H, D, generator=g) * 3).to(dtype)
    k, v = kv[:, :H], kv[:, H:]
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[3] = -1  # padding: not written
    kc = torch.zeros(nb, bs, H, D, dtype=FP8)
    vc = torch.zeros(nb, bs, H, D, dtype=FP8)
    kc2, vc2 = kc.clone(), vc.clone()
    tri.reshape_and_cache_triton(k, v, kc, vc, slots, k_scale, v_scale)
    keep = slots >= 0
    ref.reshape_and_cache_torch(k[keep], v[keep], kc2, vc2, slots[keep], k_scale, v_scale)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rot", [64, 32])
def test_rope_and_cache_fp8(dtype, rot) -> None:
    positions, q, k, v, kc, vc, kc2, vc2, slots = rope_cache_case(dtype, FP8, amplitude=2.0)
    cs = cos_sin(128, rot)
    qr, kr = tri.rope_and_cache_triton(positions, q, k, v, cs, kc, vc, slots, 0.03, 0.07)
    qe, ke = attention_rope.rope_and_cache_torch(positions, q, k, v, cs, kc2, vc2, slots, None, 0.03, 0.07)
    close(qr, qe, dtype)
    close(kr, ke, dtype)
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))
    # rotated k may differ from the reference's in its last bit (fp32 math order): at most one e4m3 step
    diff = (kc.float() - kc2.float()).abs()
    assert (diff <= kc2.float().abs() * 0.125 + 2**-9).all()
    if dtype == torch.float32:
        assert (kc.view(torch.uint8) == kc2.view(torch.uint8)).float().mean() > 0.99


def run_prefill(p: Paged, **kw):
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens_t, p.scale)
    out = tri.paged_prefill_attention_triton(*args, max(p.q_lens), max(p.seq_lens), k_scale=p.k_scale,
                                             v_scale=p.v_scale, **kw)
    return out, ref.paged_prefill_attention_torch(*args, p.k_scale, p.v_scale)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_prefill_fp8_chunked_with_cached_prefix(heads, dtype, k_scale, v_scale) -> None:
    """Fresh prompts around block boundaries and chunks after a cached prefix, GQA 1/4/8."""
    p = fp8_paged([0, 0, 5, BS, 2 * BS + 1], [BS, BS + 1, 7, BS + 1, 20], *heads, BS, dtype, k_scale, v_scale,
                  seed=1)
    out, expected = run_prefill(p)
    close(out, expected, dtype)
    if dtype == torch.float32:  # the reference == the oracle on the dequantized K/V
        torch.testing.assert_close(expected.double(), p.dense(), atol=1e-5, rtol=1e-5)


def test_prefill_fp8_tilings_fp16() -> None:
    p = fp8_paged([0, 9, 40], [37, 30, 5], 6, 2, 32, 12, torch.float16, 0.5, 0.25, seed=2)
    out, expected = run_prefill(p, block_m=64, block_n=32)
    close(out, expected, torch.float16)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_decode_fp8(heads, dtype, k_scale, v_scale) -> None:
    lens = [1, BS - 1, BS, BS + 1, 4 * BS + 3, 2]
    p = fp8_paged([n - 1 for n in lens], [1] * len(lens), *heads, BS, dtype, k_scale, v_scale)
    max_len = max(p.seq_lens)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len)
    expected = ref.paged_decode_attention_torch(*args, None, k_scale, v_scale)
    # the heuristic (several splits here, merged by a launch or by the last split) and the direct write
    for splits, merge in ((None, "launch"), (None, "last_split"), (1, "launch")):
        out = tri.paged_decode_attention_triton(*args, num_splits=splits, k_scale=k_scale, v_scale=v_scale,
                                                merge=merge)
        close(out, expected, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(expected.double(), p.dense(), atol=1e-5, rtol=1e-5)


def test_fp8_dispatch_matches_reference() -> None:
    """The dispatch functions pass the scales to the references (the CPU path of the engine)."""
    p = fp8_paged([3, 20], [1, 1], 4, 2, 32, 8, torch.float32, 0.1, 0.2, seed=3)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, 21)
    out = ref.paged_decode_attention(*args, k_scale=0.1, v_scale=0.2)
    torch.testing.assert_close(out.double(), p.dense(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "prefetch,block_n,bs,words,heads",
    # each configuration once, the head layouts (GQA 1 / 4 / 8, head_dim 64 / 128) spread over them:
    # the interpreted cross product took ~40 s of CI for an option that is off by default
    [(1, 16, BS, False, HEADS[0]), (2, 16, BS, True, HEADS[1]), (2, 32, 32, False, HEADS[2]),
     (1, 16, 8, True, HEADS[3]), (0, 16, BS, True, HEADS[1]), (0, 16, 8, True, HEADS[3])],
    ids=lambda v: f"hq{v[0]}-hkv{v[1]}-d{v[2]}" if isinstance(v, tuple) else str(v),
)
def test_decode_fp8_prefetch(prefetch, block_n, bs, words, heads) -> None:
    """The register-prefetch loop (tiles loaded 1 or 2 ahead) and the cache read as int32 words of four
    e4m3 codes: ragged lengths around block and tile boundaries (fewer tokens than the prefetch distance,
    exactly a tile, a tile + 1, a block + 1), tiles spanning several blocks (block size 8 < BLOCK_N), one
    split and several (empty splits included)."""
    lens = [1, 2, block_n, block_n + 1, bs + 1, 3 * block_n - 1, 5 * block_n + 3]
    p = fp8_paged([n - 1 for n in lens], [1] * len(lens), *heads, bs, torch.bfloat16, 0.05, 0.02, seed=7)
    max_len = max(p.seq_lens)
    args = (p.q, *p.new_kv(), p.k_cache, p.v_cache, p.block_tables, p.seq_lens_t, p.scale, max_len)
    expected = ref.paged_decode_attention_torch(*args, None, 0.05, 0.02)
    for splits in (1, 3):
        out = tri.paged_decode_attention_triton(
            *args, num_splits=splits, block_n=block_n, prefetch=prefetch, fp8_words=words, k_scale=0.05,
            v_scale=0.02,
        )
        close(out, expected, torch.bfloat16)


@triton.jit
def _decode_words(w_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
    w = tl.load(w_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    x = e4m3_words_to_f16(w, False)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * (4 * C) + tl.arange(0, 4 * C)[None, :], x)


def test_e4m3_words_decode_every_code_in_place() -> None:
    """The int32-word decode (the interpreter's byte path; the PTX one in tests/gpu): each of the 254 finite
    codes of a word, in each of its 4 places, gives torch's fp16 value (bits) at column 4 j + i. (The
    interpreter's own e4m3 conversion does not give NaN for the two NaN codes; the compiled one does.)"""
    codes = torch.cat([torch.arange(256), torch.arange(256).flip(0), torch.randperm(256), torch.randperm(256)])
    codes = codes.to(torch.uint8).view(16, 64)
    out = torch.empty(16, 64, dtype=torch.float16)
    _decode_words[(1,)](codes.view(torch.int32), out, R=16, C=16)
    expected = codes.view(FP8).to(torch.float16)
    finite = ~expected.isnan()
    assert finite.sum() == 4 * 254
    assert torch.equal(out.view(torch.int16)[finite], expected.view(torch.int16)[finite])
