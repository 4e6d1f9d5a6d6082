"""MoE kernel paths (TRITON_INTERPRET=1 on CPU) == the torch references: the Triton alignment (bit
for bit, foreign ids, several chunks); the GEMV-shaped decode launches, the default at decode (a
program per (pair, block of I rows) with the next K tile prefetched, then a program per (token, block
of H rows) adding the k slots of one [slots, rows, K] tile); foreign ids (another rank's experts)
contributing zero on every path without a zero-filled buffer; and the kernels' token-count integers
left unspecialized (no recompilation per batch size)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rtllm.kernels.moe import fused_experts_torch, moe_align_block_size
from rtllm.kernels.triton_moe import fused_experts_triton, moe_align_block_size_triton
from tests.kernels.test_moe import TOL, dense_oracle, expert_weights, gen, routing

GEMV = dict(GEMV=True)
PAIR_GEMM = dict(GEMV=False, PAIR_BLOCKS=True)
ALIGNED = dict(GEMV=False, PAIR_BLOCKS=False)


def check(T, E, k, H, inter, dtype, config, seed=0, experts=None, foreign=False, ids=None):
    g = gen(100 + seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, w2 = expert_weights(E, H, inter, dtype, seed=seed + 1)
    topk_w, topk_ids = routing(T, E, k, seed=seed + 2, experts=experts)
    if ids is not None:
        topk_ids = ids
    out = fused_experts_triton(x, w13, w2, topk_w, topk_ids, config=config, foreign_ids=foreign)
    ref = fused_experts_torch(x, w13, w2, topk_w, topk_ids)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (T, H)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    return x, w13, w2, topk_w, topk_ids, out


@pytest.mark.parametrize("T,E,k,H,inter", [(1, 16, 8, 64, 48), (1, 8, 2, 48, 40), (2, 16, 4, 64, 32),
                                           (3, 4, 1, 40, 24), (5, 8, 2, 72, 56)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_equals_reference(T, E, k, H, inter, dtype) -> None:
    """H and I off the tile sizes (masked edges), tokens sharing experts, top-1 / 2 / 4 / 8."""
    x, w13, w2, w, ids, out = check(T, E, k, H, inter, dtype, GEMV, seed=T + k,
                                    experts=list(range(0, E, 2)) if k <= E // 2 else None)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), dense_oracle(x, w13, w2, w, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiles", [dict(BLOCK_N1=8, BLOCK_K1=16, BLOCK_N2=4, BLOCK_K2=64),
                                   dict(BLOCK_N1=64, BLOCK_K1=128, BLOCK_N2=32, BLOCK_K2=8, WARPS1=2, WARPS2=8),
                                   dict(BLOCK_N1=16, BLOCK_K1=8, BLOCK_N2=2, BLOCK_K2=8)],
                         ids=str)
@pytest.mark.parametrize("H,inter", [(48, 40), (64, 32)], ids=str)
def test_gemv_tiles(tiles, H, inter) -> None:
    """Tiles narrower and wider than the widths, K tiles dividing K (the unmasked EVEN_K loads) or not,
    one K tile or several (the prefetch past the last tile loads nothing)."""
    check(2, 8, 2, H, inter, torch.float32, dict(GEMV, **tiles), seed=3)


@pytest.mark.parametrize("k", [3, 6])
def test_gemv_slots_padded(k) -> None:
    """top-k off a power of two: the down launch's slot axis is padded to 4 / 8 and the padding adds nothing."""
    check(3, 16, k, 32, 24, torch.float32, GEMV, seed=k)


def test_gemv_deterministic() -> None:
    """Fixed-order sums (no atomics): the same inputs give the same bits."""
    x, w13, w2, w, ids, out = check(4, 32, 8, 64, 48, torch.bfloat16, GEMV, seed=9)
    assert torch.equal(out, fused_experts_triton(x, w13, w2, w, ids, config=GEMV))


@pytest.mark.parametrize("config", [GEMV, PAIR_GEMM, ALIGNED], ids=["gemv", "pair_gemm", "aligned"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_foreign_ids_contribute_zero(config, k) -> None:
    """Ids outside [0, E): the decode launches skip them, the tiled path's slot sum leaves them out
    (no zero-filled buffer); a token whose slots are all foreign gets zeros."""
    T, E, H, inter = 4, 4, 32, 24
    ids = torch.tensor([[0, 5, -1], [7, 2, 4], [6, 4, 5], [3, 3, 1]], dtype=torch.int32)[:, :k].contiguous()
    *_, w, ids, out = check(T, E, k, H, inter, torch.float32, config, seed=7, foreign=True, ids=ids)
    all_foreign = ((ids < 0) | (ids >= E)).all(dim=1)
    assert all_foreign.any() and (out[all_foreign] == 0).all()


@pytest.mark.parametrize("config", [GEMV, PAIR_GEMM], ids=["gemv", "pair_gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_paths_agree_at_qwen3_routing(config, dtype) -> None:
    """Batch 1 with Qwen3-MoE's routing (8 of 128 experts), shrunken widths."""
    check(1, 128, 8, 64, 48, dtype, config, seed=11)


def test_default_paths() -> None:
    """No config: T * k <= E / 4 takes the GEMV launches (no alignment; GEMV=False: the pair-block
    GEMMs), more pairs the aligned GEMMs."""
    from rtllm.kernels.triton_moe import moe_gemm_config

    for interp in (True, False):
        small, edge, large = (moe_gemm_config(n, 128, interp) for n in (8, 32, 40))
        assert small["PAIR_BLOCKS"] and small["GEMV"] and edge["PAIR_BLOCKS"] and edge["GEMV"]
        assert not large["PAIR_BLOCKS"] and not large.get("GEMV", False)
    check(1, 32, 8, 32, 16, torch.float32, None, seed=5)
    check(2, 8, 2, 32, 16, torch.float32, None, seed=6)  # 4 pairs of 8 experts: aligned path


@pytest.mark.parametrize("T,E,k,block_m,foreign", [(1, 8, 2, 16, False), (7, 4, 2, 4, False), (33, 8, 3, 16, True),
                                                   (5, 128, 8, 16, False), (300, 128, 8, 64, True),
                                                   (1000, 60, 4, 32, False)], ids=str)
def test_triton_alignment_equals_reference(T, E, k, block_m, foreign) -> None:
    """The two-launch Triton alignment gives the torch version's outputs exactly (the last two cases
    span several chunks of pairs); ids outside [0, E) are left out, -1 among them."""
    g = gen(T + E)
    ids = torch.randint(-1 if foreign else 0, 2 * E if foreign else E, (T, k), generator=g, dtype=torch.int32)
    ref_sorted, ref_blocks = moe_align_block_size(ids, E, block_m)
    got_sorted, got_blocks = moe_align_block_size_triton(ids, E, block_m)
    assert got_sorted.dtype == got_blocks.dtype == torch.int32
    assert torch.equal(got_sorted, ref_sorted) and torch.equal(got_blocks, ref_blocks)


def test_triton_alignment_no_pairs() -> None:
    sorted_ids, blocks = moe_align_block_size_triton(torch.zeros(0, 2, dtype=torch.int32), 4, 16)
    assert sorted_ids.numel() == blocks.numel() == 0


def test_token_count_integers_are_not_specialized() -> None:
    """Triton specializes integer arguments equal to 1 or divisible by 16 (a new compiled variant);
    the ones that change with the number of tokens are exempt, so no batch size compiles anew.
    Checked on the JIT functions (outside the interpreter, which keeps no such list)."""
    code = ("from rtllm.kernels import triton_moe as t, triton_moe_gemv as v, triton_moe_routing as r\n"
            "names = lambda k: {k.arg_names[i] if isinstance(i, int) else i for i in k.do_not_specialize}\n"
            "assert {'num_pairs', 'num_m_blocks'} <= names(t._moe_gemm_kernel)\n"
            "assert 'T' in names(r._topk_softmax_kernel) and 'T' in names(t._moe_slot_sum_kernel)\n"
            "assert 'N' in names(r._moe_count_kernel)\n"
            "assert {'N', 'num_chunks', 'num_blocks'} <= names(r._moe_place_kernel)\n"
            "for k in (v._moe_gemv_gate_up_kernel, v._moe_gemv_down_kernel):\n"
            "    assert not {'T', 'num_pairs', 'num_tokens'} & set(k.arg_names)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
