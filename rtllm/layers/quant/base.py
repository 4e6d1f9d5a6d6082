"""What every quantized linear layer shares: attribute copying, the optional AWQ input scale, bias."""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import activation as act_kernels
from rtllm.parallel import comm

# set on a dense Linear by AWQ calibration when 1/s cannot be folded into the previous op: the
# weight already holds W diag(s) and the quantized layer multiplies its input by this [K] tensor
AWQ_INPUT_SCALE_ATTR = "awq_input_scale"


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter that is data, not trainable (so the model's weight bytes count it)."""
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """Base: y = (x * input_scale)[:, input_perm] W^T (+ b), with W held in some packed format by the subclass.

    Subclasses implement ``_matmul(x2d) -> y2d`` (x2d [M, K], contiguous) and
    ``dequantized_weight() -> W [N, K]`` (the reference value of W, fp32), W's input channels in
    ``input_perm`` order when one is set (GPTQ act-order checkpoints, whose groups are contiguous only
    after that permutation: the layer gathers its input instead of the kernel gathering scales).

    A gated MLP's [gate | up] projection calls ``silu_and_mul(x)`` instead of ``forward``: formats
    whose GEMM can apply the activation itself override ``_matmul_silu_and_mul``."""

    reduces_output = False  # set by copy_attributes on the replacement of a row-parallel layer

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None, input_perm: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias is not None:
            self.bias = frozen(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        if input_scale is not None:
            self.input_scale = frozen(input_scale.detach().clone())
        else:
            self.register_parameter("input_scale", None)
        if input_perm is not None:
            self.input_perm = frozen(input_perm.detach().to(torch.int64).clone())
        else:
            self.register_parameter("input_perm", None)

    def copy_attributes(self, layer: nn.Module) -> None:
        """Keep the replaced layer's plain attributes (q_size, output_sizes, ...) so model code never knows.
        A row-parallel layer's replacement all-reduces its output over the tensor-parallel group, as the
        layer did (rtllm.layers.parallel_linear.RowParallelLinear), before adding the bias."""
        for k, v in vars(layer).items():
            if not k.startswith("_") and k not in ("training", AWQ_INPUT_SCALE_ATTR) and not hasattr(self, k):
                setattr(self, k, v)
        if getattr(layer, "reduces_output", False):
            self.reduces_output = True

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmul_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul of ``_matmul(x)`` taken in x's dtype (the unfused path)."""
        return act_kernels.silu_and_mul(self._matmul(x).to(x.dtype))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] as the GEMM's [M, K] operand: AWQ's input scale and the act-order permutation applied."""
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.dtype)
        if self.input_perm is not None:
            x2 = x2.index_select(1, self.input_perm)
        return x2 if x2.is_contiguous() else x2.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(self._matmul(self._input(x)), x.dtype).view(*x.shape[:-1], self.out_features)

    def _output(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The GEMM's [M, N] output in ``dtype``, all-reduced (row-parallel) and with the bias."""
        if y.dtype != dtype:
            y = y.to(dtype)
        if self.reduces_output:
            y = comm.tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up [..., N/2] of this [gate | up] projection's output, i.e. SiLU-and-mul of
        ``self(x)``: computed by the GEMM's kernel where the format has one for this input (the decode
        GEMVs), else by the activation kernel after it. A tensor-parallel rank's gate|up holds
        [gate_r | up_r] (rtllm.layers.parallel_linear), so the halves pair up on every rank."""
        if self.bias is not None or self.reduces_output:  # the activation needs the finished output
            return act_kernels.silu_and_mul(self(x))
        return self._matmul_silu_and_mul(self._input(x)).view(*x.shape[:-1], self.out_features // 2)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{', awq_input_scale' if self.input_scale is not None else ''}"
                f"{', input_perm' if self.input_perm is not None else ''}")


def input_scale_of(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, AWQ_INPUT_SCALE_ATTR, None)
