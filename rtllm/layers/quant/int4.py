"""W4A16Linear: INT4 group-wise weights with 16-bit activations (W4A16 and W4A16_AWQ).

Two packings of the same codes, scales and zeros (``W = (q - 8) * s + z``, scales and zeros in
bf16), chosen by the device the weights live on:

- ``cpu``: torch's ``_weight_int4pack_mm_for_cpu`` layout (``packed`` uint8 [N, K/2],
  ``scales_and_zeros`` bf16 [K/g, N, 2]). Measured on this machine (torch 2.13, AVX-512 BF16): the
  kernel is vectorized for bf16 activations only; fp32 and fp16 run ~30x slower than bf16
  F.linear. So the GEMM always runs with bf16 activations (the "A16"): other dtypes are cast to
  bf16 and the result back. Needs out_features % 16 == 0 (the packer's rule).
- ``triton`` (CUDA): rtllm.kernels.quant_gemm's W4 layout (``qweight`` int32 [K/8, N],
  ``scales`` / ``zeros`` bf16 [K/g, N]): the fused Triton dequantize-GEMM up to 16 rows, Triton
  dequantize + one dense GEMM above. On a CPU tensor (tests) it runs the torch reference.
"""

from __future__ import annotations

import threading

import torch

from rtllm.errors import ConfigError
from rtllm.kernels import quant_gemm
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear, frozen, input_scale_of
from rtllm.quantization.int4 import (
    CPU_PACK_N_MULTIPLE,
    dequantize_packed_cpu_t,
    pack_int4_k8,
    pack_w4_cpu,
    quantize_w4_asym,
    unpack_w4_cpu,
)

KERNEL_DTYPE = torch.bfloat16
SCALE_DTYPE = torch.bfloat16

# CPU: batches of at least this many tokens dequantize the weight to bf16 once and run one dense
# GEMM instead of the int4 kernel. Measured (2-core AVX-512 EPYC, bf16, group 32, 30 distinct
# matrices rotated so none sits in cache; ms per matrix, int4 kernel / dequant+mm / bf16 F.linear):
#   3072x576:  M=1 0.054/0.75/0.22   M=16 0.36/0.88/0.37   M=64 1.47/2.29/0.90   M=128 2.89/2.83/1.45
#              M=256 5.83/4.10/2.64  M=1024 23.5/13.9/12.2
#   576x1536:  M=1 0.033/0.98/0.13   M=64 0.68/0.72/0.40   M=128 1.34/0.97/0.64  M=256 2.71/1.50/1.14
#   960x576:   M=1 0.022/0.65/0.10   M=64 0.50/1.27/0.41   M=128 0.94/1.28/0.58  M=256 1.69/1.50/0.91
# The kernel runs at ~160 GFLOP/s whatever M (it beats bf16 F.linear up to M~16, 4x at M=1);
# the dense path pays ~0.3-0.9 ms of dequantization per matrix and then runs at bf16 GEMM
# speed (~350 GFLOP/s). They cross between M=128 and M=256.
DEQUANT_MIN_TOKENS = 192

_tls = threading.local()  # per-thread scratch for the dense path (engines run one forward at a time per thread)


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer: fresh multi-MB allocations page-fault on every call and cost more than the work."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        bufs[dtype] = buf
    return buf[:numel]


def w4_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "triton"
    raise ConfigError(f"QuantConfig.quant_algo: INT4 weights run on CPU / CUDA only (weights are on {device})")


class W4A16Linear(QuantizedLinear):
    """y = x W^T (+ b) with W stored as INT4 codes and per-group bf16 scales and zeros.

    Backend ``cpu``: ``packed`` uint8 [N, K/2] in the CPU kernel's layout and ``scales_and_zeros``
    bf16 [K/g, N, 2] with W[n, k] = (q[n, k] - 8) * s[k//g, n, 0] + s[k//g, n, 1].
    Backend ``triton``: ``qweight`` int32 [K/8, N], ``scales`` and ``zeros`` bf16 [K/g, N].
    They are parameters (requires_grad=False) so the model's weight bytes count them.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, backend: str,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, fast_dequant: bool = False,
                 input_scale: torch.Tensor | None = None, input_perm: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias, input_scale, input_perm)
        self.group_size, self.backend = group_size, backend
        for name, t in tensors.items():
            setattr(self, name, frozen(t))
        # cpu: whether the dense path's unpacking knows the packed layout (checked against the codes at pack time)
        self.fast_dequant = fast_dequant

    @classmethod
    def supports(cls, out_features: int, device: torch.device) -> str | None:
        """None when this layer can hold such a weight, else why not."""
        if w4_backend(device) == "cpu" and out_features % CPU_PACK_N_MULTIPLE:
            return (f"out_features={out_features} is not a multiple of {CPU_PACK_N_MULTIPLE} "
                    "(the CPU int4 packer's rule)")
        return None

    @classmethod
    def from_linear(cls, layer: Linear, group_size: int, backend: str | None = None) -> W4A16Linear:
        """Quantize a loaded Linear (or fused subclass); copies its plain attributes (q_size, ...).

        ``backend``: None picks by the weight's device; "triton" on a CPU tensor packs the CUDA
        layout and runs the torch reference (tests)."""
        codes, scales, zeros = quantize_w4_asym(layer.weight, group_size)
        new = cls.from_codes(codes, scales, zeros, group_size, layer.bias, backend, input_scale_of(layer))
        new.copy_attributes(layer)
        return new

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, backend: str | None = None,
                   input_scale: torch.Tensor | None = None, input_perm: torch.Tensor | None = None) -> W4A16Linear:
        """A layer from quantized values (rtllm.quantization.int4's format): codes [N, K] in 0..15,
        scales and zeros [K/g, N] (stored in bf16). Used by quantization and by pre-quantized
        checkpoints (AWQ / GPTQ, converted by rtllm.quantization.hf_formats); ``input_perm`` as in
        QuantizedLinear. The device is the codes'."""
        N, K = codes.shape
        backend = backend or w4_backend(codes.device)
        if backend == "cpu":
            packed, sz = pack_w4_cpu(codes, scales, zeros, KERNEL_DTYPE)
            unpacked = unpack_w4_cpu(packed, N, K)
            fast = unpacked is not None and torch.equal(unpacked, codes.to(torch.uint8))
            tensors = {"packed": packed, "scales_and_zeros": sz}
        else:
            fast = False
            tensors = {"qweight": pack_int4_k8(codes), "scales": scales.to(SCALE_DTYPE),
                       "zeros": zeros.to(SCALE_DTYPE)}
        return cls(K, N, group_size, backend, tensors, bias, fast, input_scale, input_perm)

    def dequantized_weight(self) -> torch.Tensor | None:
        """W [N, K] as the dense path computes it (bf16; None on the CPU when the layout is unknown)."""
        if self.backend == "cpu":
            if not self.fast_dequant:
                return None
            K, N = self.in_features, self.out_features
            out = torch.empty(K, N, dtype=KERNEL_DTYPE)
            u8 = torch.empty(K * N // 2, dtype=torch.uint8)
            return dequantize_packed_cpu_t(self.packed, self.scales_and_zeros, self.group_size, out, u8).t()
        return quant_gemm.dequantize_w4(self.qweight, self.scales, self.zeros, KERNEL_DTYPE).t()

    def reference_weight(self) -> torch.Tensor:
        """W [N, K] in fp32 from the stored codes, scales and zeros (any backend)."""
        if self.backend == "cpu":
            w = self.dequantized_weight()
            if w is not None:
                return w.float()
            raise NotImplementedError("the CPU packed layout is not known for this shape")
        return quant_gemm.dequantize_w4_t(self.qweight, self.scales, self.zeros, torch.float32).t()

    def _kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """Backend ``triton``: x as the kernels take it (a CPU tensor other than 16-bit: bf16)."""
        return x if x.dtype in (torch.bfloat16, torch.float16) or x.is_cuda else x.to(KERNEL_DTYPE)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "cpu":
            return quant_gemm.w4a16_gemm(self._kernel_input(x), self.qweight, self.scales, self.zeros)
        K, N = self.in_features, self.out_features
        xa = x.to(KERNEL_DTYPE).contiguous()
        if xa.shape[0] >= DEQUANT_MIN_TOKENS and self.fast_dequant:
            wt = dequantize_packed_cpu_t(self.packed, self.scales_and_zeros, self.group_size,
                                         _scratch(K * N, KERNEL_DTYPE).view(K, N),
                                         _scratch(K * N // 2, torch.uint8))
            return torch.mm(xa, wt)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xa, self.packed, self.group_size, self.scales_and_zeros)

    def _matmul_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu" or self._kernel_input(x) is not x:  # the activation in x's dtype: unfused
            return super()._matmul_silu_and_mul(x)
        return quant_gemm.w4a16_gemm_silu_and_mul(x, self.qweight, self.scales, self.zeros)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_size={self.group_size}, backend={self.backend}"
                f"{f', fast_dequant={self.fast_dequant}' if self.backend == 'cpu' else ''}")

