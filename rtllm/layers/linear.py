"""Linear layers whose parameters know how to load checkpoint tensors.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` so fused layers (QKV,
gate|up) can take the checkpoint's separate q/k/v or gate/up tensors into their slice.
Their tensor-parallel variants are in rtllm.layers.parallel_linear.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import gemm
from rtllm.parallel.weights import materialize


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    loaded = materialize(loaded)  # a LazyTensor (a rank's lazy checkpoint read): the whole tensor
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b). weight: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU-and-mul of this [gate | up] projection's output, fused into its GEMM where the decode GEMV
        runs it (rtllm.kernels.gemm.linear_silu_and_mul)."""
        return gemm.linear_silu_and_mul(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input in one GEMM; output is their concatenation.

    shard_id is the index of the sub-projection (e.g. gate=0, up=1).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            return default_weight_loader(param, loaded)
        loaded = materialize(loaded)
        idx = int(shard_id)
        size = self.output_sizes[idx]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shape mismatch for shard {idx}: expected {(size, *param.shape[1:])}, got {tuple(loaded.shape)}"
            )
        param.data.narrow(0, self.offsets[idx], size).copy_(loaded)


class QKVLinear(MergedLinear):
    """Fused q|k|v projection. shard_id is "q", "k" or "v"."""

    _index = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias)
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        super().weight_loader(param, loaded, None if shard_id is None else self._index[shard_id])


def use_fast_weight_layouts(model: nn.Module) -> tuple[int, int, int]:
    """Give each dense Linear and LM-head weight of ``model`` what its GEMM reads fastest on the device,
    once, after loading (values and shapes unchanged): on a CPU a oneDNN-packed copy attached to the
    parameter as ``cpu_packed`` (rtllm.kernels.gemm.pack_for_cpu; the dense weight stays for everything
    else, e.g. a tied embedding's lookups), else the memory layout of rtllm.kernels.gemm.fast_weight_layout
    (embeddings too). A tied weight is handled once. Returns (weights packed, their bytes, weights laid
    out anew)."""
    from rtllm.layers.embedding import LMHead, VocabEmbedding
    from rtllm.layers.parallel_linear import ParallelLMHead

    gemm_weights = {id(m.weight) for m in model.modules() if isinstance(m, Linear | LMHead | ParallelLMHead)}
    packed, packed_bytes, laid_out, seen = 0, 0, 0, set()
    for m in model.modules():
        if not isinstance(m, Linear | VocabEmbedding | LMHead | ParallelLMHead) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        if id(m.weight) in gemm_weights and (p := gemm.pack_for_cpu(m.weight.data)) is not None:
            m.weight.cpu_packed = p
            packed += 1
            packed_bytes += m.weight.numel() * m.weight.element_size()
            continue
        laid = gemm.fast_weight_layout(m.weight.data)
        if laid is not m.weight.data:
            m.weight.data = laid
            laid_out += 1
    return packed, packed_bytes, laid_out
