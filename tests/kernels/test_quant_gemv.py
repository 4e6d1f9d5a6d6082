"""The decode GEMV kernels (rtllm.kernels.triton_quant_gemv), interpreted on CPU, against the exact
product of the decoded weights (fp64): W4 group-wise and W8 (int8 and e4m3 bytes), M = 1..4, ragged
N and K, split-K through the self-reducing workspace and through the torch fallback."""

import pytest
import torch

from rtllm.kernels import quant_gemm as qg
from rtllm.kernels import triton_quant_gemv as gv
from rtllm.kernels import triton_quant_gemv_config as gc
from rtllm.kernels.triton_quant_gemv import GemvConfig, w4_gemv, w8_gemv
from tests.kernels.test_quant_gemm import _gen, _w4  # the seeded generator and the random W4 layout

BF16 = torch.bfloat16


def _check(y: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == exact.shape
    assert torch.isfinite(y).all()
    if dtype == torch.float32:  # fp32 sums of exact products: far under 1e-5 of the output's scale
        assert (y.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    else:  # one rounding to bf16 (the interpreter truncates: one ulp, 2^-7 relative)
        assert ((y.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all()


# (block_n, block_k, split, prefetch): one split; splits reduced in the kernel; a block_k below the
# group (several tiles per group) with a split that does not divide the groups evenly
W4_CONFIGS = [(32, 32, 1, True), (64, 32, 3, False), (32, 16, 5, True)]


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("cfg", W4_CONFIGS, ids=lambda c: "n{}k{}s{}{}".format(*c[:3], "p" if c[3] else ""))
def test_w4_gemv_matches_exact(g, M, cfg):
    K, N = 256 if g == 32 else 512, 72  # N not a multiple of BLOCK_N: masked tail
    _, qweight, scales, zeros = _w4(K, N, g, seed=g + M)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])
    for dtype in (torch.float32, BF16):
        x = torch.randn(M, K, generator=_gen(M + 7)).to(dtype)
        _check(w4_gemv(x, qweight, scales, zeros, config), x.double() @ wt, dtype)


def test_w4_gemv_group_smaller_than_block_and_strided_x():
    K, N, g = 64, 40, 8
    _, qweight, scales, zeros = _w4(K, N, g, seed=1)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    x = torch.randn(3, 2 * K, generator=_gen(2))[:, ::2]  # non-contiguous rows
    _check(w4_gemv(x, qweight, scales, zeros, GemvConfig(32, 64, 2, 4)), x.double() @ wt, torch.float32)


def test_w4_gemv_matches_reference_within_rounding():
    """Against quant_gemm's reference (which rounds W to bf16 first): within a bf16 rounding of the row."""
    K, N, g = 256, 48, 128
    _, qweight, scales, zeros = _w4(K, N, g, seed=3)
    x = torch.randn(2, K, generator=_gen(3)).to(BF16)
    y = w4_gemv(x, qweight, scales, zeros, GemvConfig(16, 32, 2, 4))
    ref = qg.w4a16_gemm_reference(x, qweight, scales, zeros)
    exact = x.double() @ qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    assert (y.double() - ref.double()).abs().max().item() <= 2**-7 * exact.abs().max().item()


def _w8(N: int, K: int, fp8: bool, seed: int):
    gen = _gen(seed)
    if fp8:
        codes = torch.arange(256, dtype=torch.uint8)
        codes = codes[(codes & 0x7F) != 0x7F]  # every e4m3fn code but the NaNs
        q = codes[torch.randint(0, len(codes), (N, K), generator=gen)].view(torch.float8_e4m3fn)
    else:
        q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    return q, torch.rand(N, generator=gen) * 0.01 + 1e-4


W8_CONFIGS = [(16, 32, 1, True), (32, 64, 3, False), (16, 16, 4, True)]


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "e4m3"])
@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("cfg", W8_CONFIGS, ids=lambda c: "n{}k{}s{}{}".format(*c[:3], "p" if c[3] else ""))
def test_w8_gemv_matches_exact(fp8, M, cfg):
    N, K = 40, 200  # K not a multiple of BLOCK_K (32, 64): masked K tail, short last split
    q, s = _w8(N, K, fp8, seed=M + 10 * fp8)
    wq = qg.fp8_to_float(q).double() if fp8 else q.double()
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])
    for dtype in (torch.float32, BF16):
        x = torch.randn(M, K, generator=_gen(M)).to(dtype)
        _check(w8_gemv(x, q, s, config), (x.double() @ wq.t()) * s.double(), dtype)


def test_split_k_workspace_is_reset_between_launches():
    """The counters the last program resets serve the next launch (other shapes, other configs)."""
    _, qweight, scales, zeros = _w4(256, 72, 32, seed=5)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    q, s = _w8(40, 256, False, seed=6)
    for i in range(3):
        x = torch.randn(2, 256, generator=_gen(20 + i))
        _check(w4_gemv(x, qweight, scales, zeros, GemvConfig(32, 32, 4, 4)), x.double() @ wt, torch.float32)
        _check(w8_gemv(x, q, s, GemvConfig(16, 32, 3, 4)), (x.double() @ q.double().t()) * s.double(), torch.float32)
    _, counters = gv._workspaces[("cpu", None)]
    assert (counters == 0).all()


def test_split_k_without_workspace_sums_in_torch(monkeypatch):
    """Too large for the workspace (or a graph capture before it exists): partials summed by torch."""
    monkeypatch.setattr(gv, "_workspace", lambda *a: None)
    _, qweight, scales, zeros = _w4(256, 40, 64, seed=8)
    x = torch.randn(3, 256, generator=_gen(8))
    exact = x.double() @ qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    _check(w4_gemv(x, qweight, scales, zeros, GemvConfig(16, 32, 4, 4)), exact, torch.float32)
    q, s = _w8(24, 96, True, seed=9)
    _check(w8_gemv(x[:, :96], q, s, GemvConfig(16, 32, 2, 4)),
           (x[:, :96].double() @ qg.fp8_to_float(q).double().t()) * s.double(), torch.float32)


def test_tuned_table_from_file(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text('[{"kind": "w8", "M": 1, "N": 8, "K": 8, "block_n": 64, "block_k": 128, "split": 2, '
                    '"num_warps": 8, "prefetch": false}]')
    monkeypatch.setenv("RTLLM_QUANT_GEMV_CONFIG", str(path))
    monkeypatch.setattr(gc, "_env_loaded", False)
    monkeypatch.setattr(gc, "TUNED", {})
    assert gc.gemv_config("w8", 1, 8, 8, 132) == GemvConfig(64, 128, 2, 8, False)
    assert gc.gemv_config("w8", 3, 8, 8, 132) == GemvConfig(64, 128, 2, 8, False)  # M > 1 falls back to M = 1's
    dflt = gc.gemv_config("w4g128", 1, 4096, 4096, 132)
    assert dflt.block_k <= 128 and dflt.split >= 1
