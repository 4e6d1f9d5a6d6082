"""Tensor-parallel Linear layers and the factories the models build their projections with.

With tp_size == 1 the factories return the plain layers of rtllm.layers.linear / embedding (the
single-GPU model is exactly what it was). With tp_size > 1 (Megatron's split):

- column-parallel (fused q|k|v, fused gate|up): each rank holds 1/tp of every sub-projection's
  output features, its shards concatenated (q_r | k_r | v_r, gate_r | up_r), and needs no
  communication. Query heads split evenly; KV heads too, or, when tp > num_kv_heads, each rank
  holds the one KV head its query heads use (replicated over tp / num_kv_heads ranks).
- row-parallel (o_proj, down_proj): each rank holds 1/tp of the input features and the partial
  products are summed with one all-reduce; the bias is added once, after it.
- vocab-parallel embedding and LM head: each rank holds ceil(V / tp) rows (the last rank's padded
  with zeros); the embedding masks ids outside its rows and all-reduces, the LM head all-gathers
  the logits and drops the padding.

Weight loaders take checkpoint tensors whole, or rtllm.parallel.weights.LazyTensors from which
they read only this rank's shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtllm.kernels import gemm
from rtllm.layers.embedding import LMHead, VocabEmbedding
from rtllm.layers.linear import Linear, MergedLinear, QKVLinear, default_weight_loader
from rtllm.parallel import comm
from rtllm.parallel.mapping import Mapping
from rtllm.parallel.weights import materialize, narrow


def _copy(param: nn.Parameter, shard: torch.Tensor, what: str) -> None:
    if param.shape != shard.shape:
        raise ValueError(f"shape mismatch{what}: parameter {tuple(param.shape)} vs checkpoint shard "
                         f"{tuple(shard.shape)}")
    param.data.copy_(shard)


class MergedColumnParallelLinear(MergedLinear):
    """Sub-projections of global widths ``output_sizes``; this rank holds rows [r * s/tp, (r+1) * s/tp)
    of each, concatenated. shard_id: the sub-projection's index (None: the checkpoint holds them fused)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, mapping: Mapping) -> None:
        self.tp_rank, self.tp_size = mapping.tp_rank, mapping.tp_size
        self.global_sizes = list(output_sizes)
        for s in output_sizes:
            if s % self.tp_size:
                raise ValueError(f"output size {s} is not divisible by tp_size={self.tp_size}")
        super().__init__(in_features, [s // self.tp_size for s in output_sizes], bias)

    def shard_start(self, idx: int) -> int:
        """Where this rank's rows of sub-projection ``idx`` start in the checkpoint's tensor."""
        return self.tp_rank * self.output_sizes[idx]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: object = None) -> None:
        if shard_id is None:  # fused in the checkpoint: take each part's shard from its place in the whole
            if loaded.shape[0] != sum(self.global_sizes):
                raise ValueError(f"shape mismatch: fused tensor {tuple(loaded.shape)}, expected "
                                 f"{sum(self.global_sizes)} rows")
            base = 0
            for idx, size in enumerate(self.output_sizes):
                part = narrow(loaded, 0, base + self.shard_start(idx), size)
                _copy(param.data.narrow(0, self.offsets[idx], size), part, f" in part {idx}")
                base += self.global_sizes[idx]
            return
        idx = self._shard_index(shard_id)
        if loaded.shape[0] != self.global_sizes[idx] or tuple(loaded.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"shape mismatch for shard {shard_id}: expected "
                             f"{(self.global_sizes[idx], *param.shape[1:])}, got {tuple(loaded.shape)}")
        size = self.output_sizes[idx]
        param.data.narrow(0, self.offsets[idx], size).copy_(narrow(loaded, 0, self.shard_start(idx), size))

    def _shard_index(self, shard_id: object) -> int:
        return int(shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q|k|v, split by heads. shard_id is "q", "k" or "v"."""

    _index = QKVLinear._index

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 mapping: Mapping) -> None:
        tp = mapping.tp_size
        self.num_heads = num_heads // tp
        self.num_kv_heads = mapping.kv_heads_per_rank(num_kv_heads)
        self.head_dim = head_dim
        # the first KV head this rank holds: its 1/tp share, or the head its query heads read (replicated)
        self.kv_head_start = (mapping.tp_rank * num_kv_heads // tp if tp >= num_kv_heads
                              else mapping.tp_rank * self.num_kv_heads)
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        self.tp_rank, self.tp_size = mapping.tp_rank, tp
        self.global_sizes = [q, kv, kv]
        MergedLinear.__init__(self, hidden_size, [self.num_heads * head_dim, self.num_kv_heads * head_dim,
                                                  self.num_kv_heads * head_dim], bias)
        self.q_size, self.kv_size = self.output_sizes[0], self.output_sizes[1]

    def shard_start(self, idx: int) -> int:
        if idx == 0:
            return self.tp_rank * self.q_size
        return self.kv_head_start * self.head_dim

    def _shard_index(self, shard_id: object) -> int:
        return self._index[shard_id] if isinstance(shard_id, str) else int(shard_id)


class RowParallelLinear(Linear):
    """This rank holds columns [r * in/tp, (r+1) * in/tp) of the weight; y = all_reduce(x_r W_r^T) + b."""

    reduces_output = True  # a quantized layer replacing it all-reduces its output too (rtllm.layers.quant.base)

    def __init__(self, in_features: int, out_features: int, bias: bool, mapping: Mapping) -> None:
        if in_features % mapping.tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tp_size={mapping.tp_size}")
        self.tp_rank, self.tp_size = mapping.tp_rank, mapping.tp_size
        super().__init__(in_features // mapping.tp_size, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: object = None) -> None:
        if param is self.bias:
            return default_weight_loader(param, materialize(loaded))
        if loaded.dim() != 2 or loaded.shape[0] != self.out_features or \
                loaded.shape[1] != self.in_features * self.tp_size:
            raise ValueError(f"shape mismatch: expected {(self.out_features, self.in_features * self.tp_size)}, "
                             f"got {tuple(loaded.shape)}")
        _copy(param, narrow(loaded, 1, self.tp_rank * self.in_features, self.in_features), "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = comm.tp_all_reduce(gemm.linear(x, self.weight, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [r * per, (r+1) * per) of the embedding, per = ceil(vocab / tp); ids elsewhere embed to 0
    here and the all-reduce adds the owning rank's row."""

    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // mapping.tp_size)
        self.start = mapping.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: object = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"shape mismatch: expected {(self.vocab_size, param.shape[1])}, got "
                             f"{tuple(loaded.shape)}")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(narrow(loaded, 0, self.start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        out.mul_(inside.unsqueeze(-1).to(out.dtype))
        return comm.tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = all_gather(h E_r^T)[:, :vocab]. With tied embeddings the weight is the embedding's shard."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return comm.tp_all_gather(gemm.linear(hidden, self.weight), dim=-1)[..., : self.vocab_size]


# -- factories: the plain layer at tp_size 1 ------------------------------------------------------
def qkv_linear(hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
               mapping: Mapping | None) -> QKVLinear | QKVParallelLinear:
    if mapping is None or mapping.tp_size == 1:
        return QKVLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias)
    return QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias, mapping)


def merged_column_linear(in_features: int, output_sizes: list[int], bias: bool,
                         mapping: Mapping | None) -> MergedLinear:
    if mapping is None or mapping.tp_size == 1:
        return MergedLinear(in_features, output_sizes, bias)
    return MergedColumnParallelLinear(in_features, output_sizes, bias, mapping)


def row_linear(in_features: int, out_features: int, bias: bool, mapping: Mapping | None) -> Linear:
    if mapping is None or mapping.tp_size == 1:
        return Linear(in_features, out_features, bias)
    return RowParallelLinear(in_features, out_features, bias, mapping)


def vocab_embedding(vocab_size: int, hidden_size: int, mapping: Mapping | None) -> nn.Module:
    if mapping is None or mapping.tp_size == 1:
        return VocabEmbedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, mapping)


def lm_head(vocab_size: int, hidden_size: int, mapping: Mapping | None) -> nn.Module:
    if mapping is None or mapping.tp_size == 1:
        return LMHead(vocab_size, hidden_size)
    return ParallelLMHead(vocab_size, hidden_size, mapping)
