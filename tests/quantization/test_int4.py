"""W4A16: INT4 group-wise quantization, torch's CPU int4 kernel semantics, W4A16Linear, loading a model."""

import pytest
import torch

from rtllm.errors import ConfigError
from rtllm.layers import quantized_linear as ql
from rtllm.layers.linear import Linear, MergedLinear, QKVLinear
from rtllm.layers.quantized_linear import W4A16Linear, choose_group_size, quantize_linear_layers
from rtllm.quantization.config import QuantConfig
from rtllm.quantization.int4 import dequantize_w4, pack_w4_cpu, quantize_w4_asym
from tests.tiny import engine_last_logits, make_checkpoint, make_engine

BF16 = torch.bfloat16
GROUPS = (32, 64, 128, 256)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- quantize / dequantize -------------------------------------------------------------------

@pytest.mark.parametrize("g", GROUPS)
def test_quantize_dequantize_round_trip(g):
    w = torch.randn(48, 512, generator=_gen(g)) * 0.05
    codes, scales, zeros = quantize_w4_asym(w, g)
    assert codes.dtype == torch.int32 and codes.shape == w.shape
    assert scales.shape == zeros.shape == (512 // g, 48)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    deq = dequantize_w4(codes, scales, zeros)
    # round to nearest: every weight within half a step of its group's grid
    step = scales.t().repeat_interleave(g, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # code 0 is the group's min and code 15 its max
    wg = w.reshape(48, -1, g)
    torch.testing.assert_close(deq.reshape(48, -1, g).amin(-1), wg.amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(deq.reshape(48, -1, g).amax(-1), wg.amax(-1), rtol=0, atol=1e-6)
    # quantizing the dequantized tensor again is a fixed point
    codes2, scales2, zeros2 = quantize_w4_asym(deq, g)
    assert torch.equal(codes2, codes)


def test_constant_group_is_exact():
    w = torch.randn(16, 64, generator=_gen(0))
    w[3, :32] = 0.25
    w[5, 32:] = -1.5
    codes, scales, zeros = quantize_w4_asym(w, 32)
    assert scales[0, 3] == 0 and scales[1, 5] == 0
    deq = dequantize_w4(codes, scales, zeros)
    assert (deq[3, :32] == 0.25).all() and (deq[5, 32:] == -1.5).all()
    assert torch.isfinite(deq).all()


def _q41_tensor(N: int, K: int, seed: int):
    """A GGUF Q4_1 tensor: 32-weight blocks along K, fp16 d and m, w = d * q + m computed in fp32.
    GGUF's quantizer maps each block's min to code 0 and its max to code 15 (d = (max - min) / 15),
    so every block holds both; the codes in between are random here."""
    g = _gen(seed)
    blocks = K // 32
    q = torch.randint(0, 16, (N, blocks, 32), generator=g)
    pos = torch.rand(N, blocks, 32, generator=g).argsort(-1)[..., :2]  # two distinct slots per block
    q.scatter_(-1, pos[..., :1], 0)
    q.scatter_(-1, pos[..., 1:], 15)
    d = (torch.rand(N, blocks, 1, generator=g) * 0.01 + 1e-3).half()
    m = (-d.float() * (6 + 4 * torch.rand(N, blocks, 1, generator=g))).half()  # the block min, ~ -7.5 d
    w = d.float() * q.float() + m.float()
    d, m = d.float().reshape(N, blocks).t(), m.float().reshape(N, blocks).t()
    return w.reshape(N, K), q.reshape(N, K).to(torch.int32), d, m


@pytest.mark.parametrize("weight_dtype", [torch.float32, BF16])
def test_q4_1_requantizes_to_the_same_codes(weight_dtype):
    # weight_dtype: the loader keeps weights in the model dtype, so a bf16 model requantizes bf16 values
    w, q, d, m = _q41_tensor(64, 512, seed=1)
    codes, scales, zeros = quantize_w4_asym(w.to(weight_dtype), 32)
    assert torch.equal(codes, q)
    packed, sz = pack_w4_cpu(codes, scales, zeros, BF16)
    deq = dequantize_w4(codes, sz[..., 0], sz[..., 1])
    if weight_dtype == torch.float32:
        torch.testing.assert_close(scales, d, rtol=2e-6, atol=0)  # (max - min) / 15 == d up to fp32 rounding
        torch.testing.assert_close(zeros, m + 8 * d, rtol=2e-6, atol=1e-9)
        # stored for the kernel in bf16 (unit roundoff 2^-8): values within bf16 rounding of the scale and zero
        s_err = (sz[..., 0].float() - d).abs()
        z_err = (sz[..., 1].float() - (m + 8 * d)).abs()
        assert (s_err <= 2**-8 * d).all() and (z_err <= 2**-8 * (m + 8 * d).abs()).all()
        bound = 8 * s_err.t().repeat_interleave(32, 1) + z_err.t().repeat_interleave(32, 1)
        assert ((deq - w).abs() <= bound + 1e-9).all()
    else:
        # bf16 weights move min and max by up to 2^-8 |w| (|w| <~ 8 d): same codes, scales within ~2^-7
        torch.testing.assert_close(scales, d, rtol=2**-6, atol=0)
        dd = d.t().repeat_interleave(32, 1)
        assert ((deq - w).abs() <= 2**-7 * (w.abs() + 8 * dd)).all()


# -- the kernel's semantics ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float16])
@pytest.mark.parametrize("g", GROUPS)
def test_cpu_kernel_semantics(dtype, g):
    """aten._weight_int4pack_mm_for_cpu(x, pack(q), g, stack([s, z], -1)) == x @ ((q - 8) * s + z)^T,
    computed in fp32 from x, rounded once to x's dtype (the result is x's dtype)."""
    N, K = 64, 512
    q = torch.randint(0, 16, (N, K), generator=_gen(g), dtype=torch.int32)
    s = torch.rand(K // g, N, generator=_gen(1)) * 0.02
    z = torch.randn(K // g, N, generator=_gen(2)) * 0.02
    packed, sz = pack_w4_cpu(q, s, z, dtype)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert sz.shape == (K // g, N, 2) and sz.dtype == dtype
    w = dequantize_w4(q, sz[..., 0], sz[..., 1])  # fp32
    for M in (1, 5):
        x = torch.randn(M, K, generator=_gen(M)).to(dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
        assert y.dtype == dtype
        ref = x.float() @ w.t()
        ulp = torch.finfo(dtype).eps
        assert ((y.float() - ref).abs() <= ulp * ref.abs() + 1e-5 * ref.abs().max()).all()


def test_cpu_kernel_limits():
    q = torch.randint(0, 16, (40, 64), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dividable by 16"):
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_w4_cpu(q, torch.ones(2, 40), torch.zeros(2, 40))
    q = torch.randint(0, 16, (64, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    with pytest.raises(RuntimeError, match="divisible by qGroupSize"):
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, 96), packed, 64, torch.ones(2, 64, 2))
    with pytest.raises(RuntimeError, match="qGroupSize"):
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, 96), packed, 16, torch.ones(6, 64, 2))


@pytest.mark.parametrize("g", GROUPS)
def test_awq_fake_quant_is_quantize_then_dequantize(g):
    """The AWQ searches' one-pass fake quantization equals the stored format's round trip to the bit,
    constant groups (scale 0) included."""
    from rtllm.quantization.awq import fake_quant_w4

    w = torch.randn(48, 512, generator=_gen(g)) * torch.rand(48, 1, generator=_gen(g + 1)) * 3
    w[5, :g] = 0.25  # a constant group
    codes, scales, zeros = quantize_w4_asym(w, g)
    assert torch.equal(fake_quant_w4(w, g), dequantize_w4(codes, scales.to(BF16), zeros.to(BF16)))
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant_w4(w[:, :100], g)


# -- W4A16Linear -----------------------------------------------------------------------------

def _linear(K: int, N: int, dtype, bias=True, seed=0) -> Linear:
    lin = Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=_gen(seed)) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=_gen(seed + 1)))
    return lin.to(dtype).requires_grad_(False)


def _reference_weight(lin: Linear, g: int) -> torch.Tensor:
    """The layer's weight after W4 quantization, scales and zeros rounded to bf16 as stored (fp32)."""
    codes, scales, zeros = quantize_w4_asym(lin.weight, g)
    return dequantize_w4(codes, scales.to(BF16), zeros.to(BF16))


def _assert_one_rounding_apart(y: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor) -> None:
    """``y`` equals ``bf16(pre) + bias`` up to one bf16 ulp of the fp32 product ``pre`` (summation
    order, which differs between CPUs' kernels, can flip its rounding) and the rounding of the add."""
    ref = pre.to(BF16).to(y.dtype) + bias
    err = (y.float() - ref.float()).abs()
    bound = 2**-7 * pre.abs() + 2**-8 * ref.float().abs() + 1e-6
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements off, worst by {(err - bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("g", GROUPS)
def test_w4a16_linear_equals_linear_with_dequantized_weight(dtype, g):
    lin = _linear(512, 192, dtype)
    layer = W4A16Linear.from_linear(lin, g)
    assert layer.packed.dtype == torch.uint8 and layer.scales_and_zeros.dtype == BF16
    w = _reference_weight(lin, g)
    for M in (1, 5, 64):
        x = torch.randn(M, 512, generator=_gen(M)).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (M, 192)
        # the same math: x in bf16 (the "A16"), fp32 products and sums, one rounding to bf16
        pre = x.to(BF16).float() @ w.t()
        _assert_one_rounding_apart(y, pre, lin.bias)
    assert layer(torch.randn(2, 3, 512).to(dtype)).shape == (2, 3, 192)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_w4a16_dense_path_for_large_batches(dtype):
    g, M = 64, ql.DEQUANT_MIN_TOKENS
    lin = _linear(512, 192, dtype)
    layer = W4A16Linear.from_linear(lin, g)
    if not layer.fast_dequant:
        pytest.skip("this torch/CPU packs int4 in a layout unpack_w4_cpu does not know: the kernel serves all M")
    wd = layer.dequantized_weight()  # bf16, as the dense path computes it
    codes, scales, zeros = quantize_w4_asym(lin.weight, g)
    s, z = scales.to(BF16).float(), zeros.to(BF16).float()
    w = dequantize_w4(codes, s, z)
    # q * s, z - 8 s and their sum each rounded to bf16 (unit roundoff 2^-8): within those roundings
    span = (15 * s.abs() + (z - 8 * s).abs()).t().repeat_interleave(g, 1) + w.abs()
    assert ((wd.float() - w).abs() <= 2**-8 * span).all()
    x = torch.randn(M, 512, generator=_gen(7)).to(dtype)
    y = layer(x)
    _assert_one_rounding_apart(y, x.to(BF16).float() @ wd.float().t(), lin.bias)
    # and close to the kernel's answer for the same rows (bf16 weight rounding apart)
    k = torch.cat([layer(x[i:i + 64]) for i in range(0, M, 64)])
    assert (y - k).abs().max() <= 2e-2 * k.abs().max()


def test_unknown_layout_falls_back_to_the_kernel():
    lin = _linear(128, 80, torch.float32)  # 80 rows: the packer's tail block, which unpack_w4_cpu does not model
    layer = W4A16Linear.from_linear(lin, 32)
    assert not layer.fast_dequant and layer.dequantized_weight() is None
    x = torch.randn(ql.DEQUANT_MIN_TOKENS + 8, 128, generator=_gen(3))
    _assert_one_rounding_apart(layer(x), x.to(BF16).float() @ _reference_weight(lin, 32).t(), lin.bias)


def test_quantize_linear_layers_keeps_fused_layout():
    model = torch.nn.Module()
    model.qkv = QKVLinear(128, 16, 4, 2, bias=True)
    model.gate_up = MergedLinear(96, [64, 64])
    model.odd_k = Linear(100, 64)  # no supported group divides 100
    model.odd_n = Linear(64, 40)  # 40 rows: not a multiple of 16
    model.head = torch.nn.Linear(64, 64)  # not an rtllm Linear: left alone
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.requires_grad_(False)
    qkv_w = model.qkv.weight.clone()
    with pytest.raises(ConfigError,
                       match=r"QuantConfig\.group_size=128: does not divide in_features=96.*\[32\].*gate_up"):
        quantize_linear_layers(model, QuantConfig("W4A16", group_size=128))  # explicit: must divide
    assert isinstance(model.qkv, QKVLinear)  # validated before any layer was replaced
    report = quantize_linear_layers(model, QuantConfig("W4A16"))  # None: 128, else the largest that divides
    assert report.quantized == {"qkv": 128, "gate_up": 32}
    assert set(report.skipped) == {"odd_k", "odd_n"}
    assert isinstance(model.qkv, W4A16Linear) and isinstance(model.gate_up, W4A16Linear)
    assert isinstance(model.odd_k, Linear) and isinstance(model.head, torch.nn.Linear)
    assert (model.qkv.q_size, model.qkv.kv_size, model.qkv.output_sizes) == (64, 32, [64, 32, 32])
    assert model.gate_up.output_sizes == [64, 64]
    # the fused weight quantized as a whole == its parts quantized alone (rows are independent)
    x = torch.randn(3, 128, generator=_gen(0))
    y = model.qkv(x)
    for lo, hi in ((0, 64), (64, 96), (96, 128)):
        part = Linear(128, hi - lo, bias=True)
        part.weight.data.copy_(qkv_w[lo:hi])
        part.bias.data.copy_(model.qkv.bias[lo:hi])
        assert torch.equal(W4A16Linear.from_linear(part, 128)(x), y[:, lo:hi])
    assert choose_group_size(576, 128) == 64 and choose_group_size(1536, 256) == 256
    assert choose_group_size(48, 256) is None


# -- a model, end to end ---------------------------------------------------------------------

def _dequantized_reference(path: str, g: int):
    """The unquantized model with every Linear's weight replaced by its dequantized W4 value."""
    from rtllm.models.loader import load_model

    ref = load_model(path, "float32", "cpu", max_positions=512)
    with torch.no_grad():
        for _, m in ref.model.named_modules():
            if isinstance(m, Linear):
                m.weight.copy_(_reference_weight(m, choose_group_size(m.in_features, g)))
    return ref


def test_llama_w4a16_matches_dequantized_model(tmp_path):
    from rtllm.models.loader import load_model

    path = str(tmp_path)
    make_checkpoint(path, "llama")
    g = 64
    dense = load_model(path, "float32", "cpu", max_positions=512)
    # the embedding and LM head kept dense (exclude_modules): this test compares INT4 linear layers alone
    qc = QuantConfig("W4A16", g, exclude_modules=["embed_tokens", "lm_head"])
    q = load_model(path, "float32", "cpu", max_positions=512, quant_config=qc)
    layers = [m for m in q.model.modules() if isinstance(m, W4A16Linear)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer; embeddings, norms, lm_head stay dense
    assert not any(type(m) in (Linear, MergedLinear, QKVLinear) for m in q.model.modules())
    assert q.model.lm_head.weight.dtype == torch.float32
    assert q.weight_bytes < dense.weight_bytes
    linear_params = sum(m.in_features * m.out_features for m in layers)
    other = sum(p.numel() * 4 for n, p in q.model.named_parameters() if not n.endswith(
        ("packed", "scales_and_zeros", "bias")))
    assert q.weight_bytes == other + linear_params // 2 + linear_params // g * 4 + sum(
        m.bias.numel() * 4 for m in layers if m.bias is not None)

    ref = make_engine(path, loaded=_dequantized_reference(path, g))
    unq = make_engine(path, loaded=dense)
    eng = make_engine(path, loaded=q)
    gen = _gen(0)
    # 40 tokens: the int4 kernel; 200 tokens (>= DEQUANT_MIN_TOKENS): dequantize + dense GEMM
    for n in (40, 200):
        prompt = torch.randint(0, 256, (n,), generator=gen).tolist()
        want, got, base = (engine_last_logits(e, prompt) for e in (ref, eng, unq))
        err, quant_err = (got - want).abs().max().item(), (base - want).abs().max().item()
        scale = want.abs().max().item()
        # Tolerance: the W4A16 model differs from its dequantized fp32 twin only by bf16 rounding of
        # activations entering each of the 8 quantized GEMMs and of their outputs (2^-8 relative each,
        # plus bf16 weights on the dense path): ~1% of the logit range; the 4-bit quantization itself
        # moves the logits several times more, so a wrong scale, zero or code would not pass.
        assert err <= 1e-2 * scale, (n, err, scale)
        assert err <= 0.25 * quant_err, (n, err, quant_err)


# -- configuration ---------------------------------------------------------------------------

def test_quant_config_validation():
    assert QuantConfig().quant_algo is None and not QuantConfig().enabled
    assert QuantConfig("w4a16").quant_algo == "W4A16" and QuantConfig("W4A16", 32).group_size == 32
    with pytest.raises(ConfigError, match=r"QuantConfig\.quant_algo='FP4'.*\['FP8', 'W8A16', 'W4A16', "
                                          r"'W4A16_AWQ', 'NVFP4'\]"):
        QuantConfig("FP4")
    with pytest.raises(ConfigError, match=r"QuantConfig\.quant_algo"):
        QuantConfig(4)
    for bad in (16, 100, 512, True, "64", 64.0):
        with pytest.raises(ConfigError, match=r"QuantConfig\.group_size"):
            QuantConfig("W4A16", group_size=bad)
    from rtllm.llmapi.llm_args import LlmArgs

    with pytest.raises(ConfigError, match=r"LlmArgs\.quant_config"):
        LlmArgs("model-dir", device="cpu", quant_config="w4a16")
    args = LlmArgs("model-dir", device="cpu", quant_config=QuantConfig("W4A16", 64))
    assert args.engine_config().quant_config == QuantConfig("W4A16", 64)


def test_w4a16_devices(tmp_path, monkeypatch):
    qc = QuantConfig("W4A16")
    qc.check_device("cuda:0")  # the Triton kernel serves CUDA
    qc.check_device("cpu")
    with pytest.raises(ConfigError, match="W4A16 runs on CPU / CUDA only"):
        qc.check_device("mps")
    QuantConfig().check_device("mps")  # no quantization: any device
    from rtllm.models.loader import load_model

    # fails before any weight is read
    with pytest.raises(ConfigError, match="CPU / CUDA only"):
        load_model(str(tmp_path / "missing"), "bfloat16", "mps", quant_config=qc)
    from rtllm.llmapi.llm_args import LlmArgs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert LlmArgs("model-dir", device="cuda", quant_config=qc).quant_config is qc
    # weights on a device without kernels (meta)
    with torch.device("meta"):
        model = torch.nn.Sequential(Linear(64, 64))
    with pytest.raises(ConfigError, match="CPU / CUDA only"):
        quantize_linear_layers(model, qc)
