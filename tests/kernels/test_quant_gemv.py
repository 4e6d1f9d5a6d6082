"""The decode GEMV kernels (rtllm.kernels.triton_quant_gemv), interpreted on CPU, against the exact
product of the decoded weights (fp64): W4 group-wise and W8 (int8 and e4m3 bytes), M = 1..4, ragged
N and K, split-K through the self-reducing workspace and through the torch fallback. SiLU-and-mul in
the epilogue against the unfused GEMV + activation kernel (bit for bit) and the fp64 oracle, and its
dispatch (rtllm.kernels.quant_gemm.*_silu_and_mul)."""

import pytest
import torch

from rtllm.kernels import dispatch
from rtllm.kernels import quant_gemm as qg
from rtllm.kernels import triton_quant_gemv as gv
from rtllm.kernels import triton_quant_gemv_config as gc
from rtllm.kernels.triton_activation import silu_and_mul_triton
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


# each configuration at both groups and at the engine's row counts (1, 2), one at the kernel's largest (4):
# not the whole product (interpreted, it took ~40 s of CI)
W4_CASES = [(c, g, m) for c in W4_CONFIGS for g, m in ((32, 1), (128, 2))] + [(W4_CONFIGS[2], 128, 4)]


def _w4_id(v):
    return "n{}k{}s{}{}".format(*v[:3], "p" if v[3] else "") if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("cfg,g,M", W4_CASES, ids=_w4_id)
def test_w4_gemv_matches_exact(g, M, cfg):
    K, N = 256 if g == 32 else 512, 72  # N not a multiple of BLOCK_N: masked tail
    _, qweight, scales, zeros = _w4(K, N, g, seed=g + M)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])
    for dtype in (torch.float32, BF16):
        x = torch.randn(M, K, generator=_gen(M + 7)).to(dtype)
        _check(w4_gemv(x, qweight, scales, zeros, config), x.double() @ wt, dtype)


# (block_n, block_k, split) of the tensor-core kernel: one m64 MMA of rows with the K tile = the group
# (32: one operand block); a tile over two groups (block_k clipped to the group) with splits reduced
# in the kernel; two MMA row blocks with a split that leaves the last one short
W4_TC_CONFIGS = [(64, 32, 1), (64, 128, 3), (128, 128, 5)]


# each configuration with a group under, at and over its K tile, each row count twice (not the product)
W4_TC_CASES = [(W4_TC_CONFIGS[0], 32, 1), (W4_TC_CONFIGS[0], 128, 2), (W4_TC_CONFIGS[1], 32, 2),
               (W4_TC_CONFIGS[1], 64, 4), (W4_TC_CONFIGS[2], 128, 4), (W4_TC_CONFIGS[2], 64, 1)]


@pytest.mark.parametrize("cfg,g,M", W4_TC_CASES,
                         ids=lambda v: "n{}k{}s{}t".format(*v) if isinstance(v, tuple) else str(v))
def test_w4_tc_gemv_matches_exact(g, M, cfg):
    """The tensor-core kernel (interpreted: its pure-Triton decode) in bf16 and fp16 x: the permuted K
    of operand and x, scales on the fp32 group sums, zeros through the sums of x."""
    K, N = 640, 72  # N: a masked tail; K: 5 groups of 128 (uneven splits), 20 of 32
    _, qweight, scales, zeros = _w4(K, N, g, seed=g + M)
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, tc=True)
    assert gv._w4_tensor_cores(torch.empty(1, dtype=BF16), config, min(cfg[1], g))
    for dtype in (BF16, torch.float16):
        s, z = scales.to(dtype), zeros.to(dtype)
        x = torch.randn(M, K, generator=_gen(M + 7)).to(dtype)
        exact = x.double() @ qg.dequantize_w4_t(qweight, s, z, torch.float32).double()
        _check(w4_gemv(x, qweight, s, z, config), exact, dtype)


def test_w4_tc_config_falls_back_to_cuda_cores():
    """fp32 x, a group under one operand block (32 K) or fewer than 64 columns: the CUDA-core kernel."""
    cfg = GemvConfig(64, 128, 2, 4, tc=True)
    assert not gv._w4_tensor_cores(torch.empty(1), cfg, 128)
    assert not gv._w4_tensor_cores(torch.empty(1, dtype=BF16), cfg, 16)
    assert not gv._w4_tensor_cores(torch.empty(1, dtype=BF16), GemvConfig(32, 128, 2, 4, tc=True), 128)
    K, N, g = 128, 72, 16
    _, qweight, scales, zeros = _w4(K, N, g, seed=4)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    for dtype in (torch.float32, BF16):
        x = torch.randn(2, K, generator=_gen(4)).to(dtype)
        _check(w4_gemv(x, qweight, scales, zeros, cfg), x.double() @ wt, dtype)


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_w4_tc_packed_decode_formula(dtype):
    """The compiled kernel's decode (inline asm, which the interpreter cannot run), in torch on every
    word byte pair: ((w >> s) & 0x000F000F) | magic is the 16-bit pair (2^7 + q, 2^7 + q') (fp16:
    2^10), and one packed subtract of 2^7 + 8 (2^10 + 8) gives q - 8 and q' - 8 exactly; nibble s/4
    in the low half, nibble s/4 + 4 in the high half, as _w4_pair's fallback returns them."""
    magic, off = (0x4300, 0x4308) if dtype == BF16 else (0x6400, 0x6408)
    lo, hi = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    w = (lo | hi << 16).reshape(-1).to(torch.int32)  # every byte in bits 0..7 and in bits 16..23
    w = w << torch.tensor([0, 8], dtype=torch.int32).view(2, 1)  # ... and in bytes 1 and 3
    for shift in (0, 4, 8, 12):
        pair = ((w >> shift) & 0x000F000F) | (magic << 16 | magic)
        halves = pair.view(torch.int16).view(dtype).reshape(*w.shape, 2)  # little-endian: low half first
        codes = halves - torch.tensor(off, dtype=torch.int16).view(dtype)  # one rounding in dtype
        assert codes.dtype == dtype
        for j, half in ((shift // 4, 0), (shift // 4 + 4, 1)):
            q = (w >> (4 * j)) & 0xF
            assert torch.equal(codes[..., half].float(), (q - 8).float())


def test_w4_tc_operand_k_order():
    """_w4_tc_k is a permutation of the tile's K, and the nibble it names for operand column c is the
    one _w4_operand places there: word 4 s + t, nibble (2 h + u) + 4 v for c = 32 s + 16 h + 8 u + 2 t + v."""
    for bk in (32, 64, 128):
        c = torch.arange(bk)
        k = 8 * (4 * (c // 32) + (c // 2) % 4) + 2 * ((c // 16) % 2) + (c // 8) % 2 + 4 * (c % 2)
        assert sorted(k.tolist()) == list(range(bk))
        assert ((k // 8) % 4 == (c // 2) % 4).all()  # a quad's thread t reads word t of each 4


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


@pytest.mark.parametrize("K", [200, 198], ids=["words", "bytes"])
def test_fp8_gemv_reads_codes_as_words_where_rows_allow(K):
    """e4m3 rows of whole 4-byte words are read as int32 words (four codes a load element, decoded in pairs);
    other rows byte by byte. Both against the exact product, with a masked K tail and a split."""
    N = 24
    q, s = _w8(N, K, True, seed=K)
    assert gv._e4m3_words(q.view(torch.uint8), "fp8", 64) == (K % 4 == 0)
    x = torch.randn(2, K, generator=_gen(K))
    exact = (x.double() @ qg.fp8_to_float(q).double().t()) * s.double()
    _check(w8_gemv(x, q, s, GemvConfig(16, 64, 2, 4, True)), exact, torch.float32)


def test_split_k_workspace_is_reset_between_launches():
    """The counters the last program resets serve the next launch (other shapes, other configs)."""
    _, qweight, scales, zeros = _w4(256, 72, 32, seed=5)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    q, s = _w8(40, 256, False, seed=6)
    for i in range(3):
        x = torch.randn(2, 256, generator=_gen(20 + i))
        _check(w4_gemv(x, qweight, scales, zeros, GemvConfig(32, 32, 4, 4)), x.double() @ wt, torch.float32)
        _check(w8_gemv(x, q, s, GemvConfig(16, 32, 3, 4)), (x.double() @ q.double().t()) * s.double(), torch.float32)
    _, counters = gv._workspace(torch.device("cpu"), 0, 0)
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


# -- SiLU-and-mul in the epilogue ---------------------------------------------------------------


def _check_gated(fused: torch.Tensor, unfused_gate_up: torch.Tensor, exact_gate_up: torch.Tensor) -> None:
    """The fused output is the activation kernel over the unfused GEMV's output, bit for bit (the same
    roundings, the same split order); and near silu(gate) * up of the exact product, which catches
    gate and up columns paired wrongly even where both paths agree: four roundings to bf16 (gate, up,
    silu, product) that the interpreter truncates (2^-7 relative each), 2^-5 of the row's largest."""
    unfused = silu_and_mul_triton(unfused_gate_up)
    assert fused.dtype == unfused.dtype and fused.shape == unfused.shape
    assert torch.equal(fused, unfused)
    g, u = exact_gate_up.chunk(2, dim=-1)
    exact = g * torch.sigmoid(g) * u
    tol = 2**-5 * exact.abs().amax(-1, keepdim=True) + 1e-6
    assert ((fused.double() - exact).abs() <= tol).all()


GATED_W4_CONFIGS = [(32, 32, 1, True, False), (64, 32, 3, False, False),  # one split; splits reduced in
                    (64, 32, 1, False, True), (128, 64, 3, False, True)]  # the kernel; CUDA cores, tensor cores


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("cfg", GATED_W4_CONFIGS,
                         ids=lambda c: "n{}k{}s{}{}{}".format(*c[:3], "p" if c[3] else "", "t" if c[4] else ""))
def test_w4_gemv_silu_and_mul_equals_unfused(g, M, cfg):
    inter, K = 36, 256  # I not a multiple of BLOCK_N / 2: the last tile's gate and up halves are masked
    _, qweight, scales, zeros = _w4(K, 2 * inter, g, seed=g + M)
    wt = qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double()
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3], cfg[4])
    x = torch.randn(M, K, generator=_gen(M + 3)).to(BF16)
    y = w4_gemv(x, qweight, scales, zeros, config, silu_and_mul=True)
    _check_gated(y, w4_gemv(x, qweight, scales, zeros, config), x.double() @ wt)


GATED_W8_CONFIGS = [(16, 32, 1, True), (32, 64, 3, False)]


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "e4m3"])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("cfg", GATED_W8_CONFIGS, ids=lambda c: "n{}k{}s{}{}".format(*c[:3], "p" if c[3] else ""))
def test_w8_gemv_silu_and_mul_equals_unfused(fp8, M, cfg):
    inter, K = 20, 200  # neither I nor K a multiple of the block
    q, s = _w8(2 * inter, K, fp8, seed=M + 10 * fp8)
    wq = qg.fp8_to_float(q).double() if fp8 else q.double()
    config = GemvConfig(cfg[0], cfg[1], cfg[2], 4, cfg[3])
    x = torch.randn(M, K, generator=_gen(M)).to(BF16)
    y = w8_gemv(x, q, s, config, silu_and_mul=True)
    _check_gated(y, w8_gemv(x, q, s, config), (x.double() @ wq.t()) * s.double())


def test_gemv_silu_and_mul_fp32_and_torch_summed_splits(monkeypatch):
    """fp32 activations (no rounding between the GEMV and the activation), and split partials summed by
    torch when the workspace cannot serve the launch (the activation kernel then runs after the sum)."""
    _, qweight, scales, zeros = _w4(128, 48, 32, seed=11)
    q, s = _w8(48, 96, True, seed=12)
    x = torch.randn(2, 128, generator=_gen(13))
    cfg4, cfg8 = GemvConfig(32, 32, 4, 4), GemvConfig(16, 32, 3, 4)
    for torch_sum in (False, True):
        if torch_sum:
            monkeypatch.setattr(gv, "_workspace", lambda *a: None)
        _check_gated(w4_gemv(x, qweight, scales, zeros, cfg4, silu_and_mul=True),
                     w4_gemv(x, qweight, scales, zeros, cfg4),
                     x.double() @ qg.dequantize_w4_t(qweight, scales, zeros, torch.float32).double())
        _check_gated(w8_gemv(x[:, :96], q, s, cfg8, silu_and_mul=True), w8_gemv(x[:, :96], q, s, cfg8),
                     (x[:, :96].double() @ qg.fp8_to_float(q).double().t()) * s.double())


@pytest.fixture
def gemv_on_cpu(monkeypatch):
    """quant_gemm dispatches to the Triton kernels (interpreted) as on CUDA; the activation too."""
    from rtllm.kernels import activation

    monkeypatch.setattr(qg, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    launches = []
    for name in ("w4_gemv", "w8_gemv"):
        real = getattr(gv, name)
        monkeypatch.setattr(gv, name, lambda *a, _real=real, **kw: launches.append(kw.get("silu_and_mul", False))
                            or _real(*a, **kw))
    return launches


@pytest.mark.parametrize("fmt", ["w4", "int8", "fp8"])
def test_silu_and_mul_dispatch(gemv_on_cpu, monkeypatch, fmt):
    """M <= 2: one fused launch, equal to the GEMM then silu_and_mul; M = 3: the GEMM (tensor-core
    kernel) then the activation; a plugin's silu_and_mul is honoured (it sees gate|up: no fusion)."""
    launches = gemv_on_cpu
    K, N = 128, 64
    if fmt == "w4":
        w = _w4(K, N, 32, seed=21)[1:]
        gemm, fused = qg.w4a16_gemm, qg.w4a16_gemm_silu_and_mul
    else:
        w = _w8(N, K, fmt == "fp8", seed=22)
        gemm, fused = (qg.fp8_gemm, qg.fp8_gemm_silu_and_mul) if fmt == "fp8" else (qg.w8a16_gemm,
                                                                                    qg.w8a16_gemm_silu_and_mul)
    for M in (1, 2, 3):
        x = torch.randn(M, K, generator=_gen(M)).to(BF16)
        launches.clear()
        y = fused(x, *w)
        assert launches == ([True] if M <= 2 else [])
        assert torch.equal(y, silu_and_mul_triton(gemm(x, *w)))
    seen = []
    dispatch.register_kernel("silu_and_mul", lambda t: seen.append(t.shape) or silu_and_mul_triton(t))
    try:
        launches.clear()
        x = torch.randn(1, K, generator=_gen(5)).to(BF16)
        assert torch.equal(fused(x, *w), silu_and_mul_triton(gemm(x, *w)))
        assert launches[0] is False and seen[0] == (1, N)
    finally:
        dispatch.unregister_kernel("silu_and_mul")
    monkeypatch.setattr(qg, "GEMV_SILU", False)  # RTLLM_GEMV_SILU=0
    launches.clear()
    fused(x, *w)
    assert launches == [False]
