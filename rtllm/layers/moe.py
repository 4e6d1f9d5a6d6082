"""Mixture-of-experts MLP: a router and E gated experts held as two stacked tensors.

``FusedMoE`` computes, for each token, ``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over its
top-k experts e (softmax over the router logits, top-k, optionally renormalized). Expert weights
live stacked, ``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]``, so the grouped
GEMM kernel (rtllm.kernels.moe) runs all experts in one launch.

Checkpoints store experts one tensor each (``experts.N.gate_proj`` / ``w1``, ...) or already
stacked (transformers 5 in memory: ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj``);
``load_expert`` takes either.

Split across ranks (``mapping`` with tp_size > 1; rtllm.parallel.Mapping), the tensor-parallel group
of tp_size ranks is factored as moe_ep_size x moe_tp_size:

- expert parallel: a rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep). The router is
  replicated and routes over all E experts; a rank runs only the (token, slot) pairs of its own
  experts (the kernels skip ids outside [0, E_local)). Attention is tensor-parallel, so every rank
  of the group already holds every token: dispatch is this local selection and the combine is the
  group's all-reduce (the all-gather / reduce-scatter form of expert parallelism);
- MoE tensor parallel: each expert's intermediate dimension is split moe_tp ways (gate and up rows,
  down columns), like the dense MLP's column / row split.

Each rank's output is a partial sum over its experts and its intermediate slice; one all-reduce over
the tensor-parallel group sums them (the same place the dense MLP's row-parallel down_proj reduces).
A rank reads only its experts' shards of the checkpoint (rtllm.parallel.weights.narrow).
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import gemm
from rtllm.kernels import moe as moe_kernels
from rtllm.layers.linear import Linear
from rtllm.layers.quant.base import QuantizedLinear
from rtllm.parallel import comm
from rtllm.parallel.mapping import Mapping
from rtllm.parallel.weights import LazyTensor, narrow

# checkpoint spelling of an expert's projection -> (stacked parameter, shard: 0 gate, 1 up, None whole)
EXPERT_SHARDS = {
    "gate_proj": ("w13", 0), "w1": ("w13", 0),
    "up_proj": ("w13", 1), "w3": ("w13", 1),
    "down_proj": ("w2", None), "w2": ("w2", None),
}


class MoeRouter(nn.Module):
    """Router logits ``x @ weight^T`` [T, E]. Deliberately not a ``Linear``: quantizing the model's
    linear layers leaves it dense, since rounding its logits would change which experts run."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, None)

    def route(self, x: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights fp32 [T, k], topk_ids int32 [T, k]): softmax of ``forward(x)``, top k, optionally
        renormalized; at batch decode the GEMM and the routing run as one kernel."""
        return moe_kernels.route(x, self.weight, top_k, renormalize)


class FusedMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, mapping: Mapping | None = None) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"FusedMoE: top_k={top_k} must be in 1..num_experts={num_experts}")
        split = mapping is not None and mapping.tp_size > 1
        self.tp_size = mapping.tp_size if split else 1
        ep, ep_rank = (mapping.moe_ep_size, mapping.moe_ep_rank) if split else (1, 0)
        mtp, mtp_rank = (mapping.moe_tp_size, mapping.moe_tp_rank) if split else (1, 0)
        if num_experts % ep or intermediate_size % mtp:
            raise ValueError(f"FusedMoE: num_experts={num_experts} / moe_ep_size={ep} and intermediate_size="
                             f"{intermediate_size} / moe_tp_size={mtp} must divide evenly")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size  # global (checkpoint) sizes
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.num_local_experts = num_experts // ep
        self.expert_start = ep_rank * self.num_local_experts  # this rank's first expert (global index)
        self.local_intermediate = intermediate_size // mtp
        self.inter_start = mtp_rank * self.local_intermediate  # this rank's slice of each expert's width
        self.gate = MoeRouter(hidden_size, num_experts)
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * self.local_intermediate, hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, self.local_intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x.dtype (summed over the tensor-parallel group when split)."""
        topk_weights, topk_ids = self.gate.route(x, self.top_k, self.renormalize)
        foreign = self.num_local_experts < self.num_experts
        if foreign:  # global expert ids -> this rank's; other ranks' experts fall outside [0, E_local)
            topk_ids = topk_ids - self.expert_start
        out = moe_kernels.fused_experts(x, self.w13, self.w2, topk_weights, topk_ids, foreign_ids=foreign)
        return comm.tp_all_reduce(out) if self.tp_size > 1 else out

    def is_local(self, expert: int) -> bool:
        """Whether global expert ``expert`` lives on this rank."""
        return self.expert_start <= expert < self.expert_start + self.num_local_experts

    @torch.no_grad()
    def load_expert(self, proj: str, loaded: torch.Tensor | LazyTensor, expert: int | None = None) -> str | None:
        """Copy one checkpoint tensor into this rank's part of the stacked weights; returns the
        parameter's name, or None for an expert another rank holds (nothing is read).

        ``proj``: a key of EXPERT_SHARDS with ``expert`` the expert's global index, or a stacked
        ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] with ``expert`` None. ``loaded`` may be a
        LazyTensor: only this rank's experts and intermediate slice are read."""
        inter, local, start = self.intermediate_size, self.local_intermediate, self.inter_start
        if expert is None:
            name = {"gate_up_proj": "w13", "down_proj": "w2"}.get(proj)
            if name is None:
                raise ValueError(f"stacked expert tensor {proj!r}: expected gate_up_proj or down_proj")
            full = ((self.num_experts, 2 * inter, self.hidden_size) if name == "w13"
                    else (self.num_experts, self.hidden_size, inter))
            if tuple(loaded.shape) != full:
                raise ValueError(f"shape mismatch: {proj} {tuple(loaded.shape)} vs expected {full} "
                                 "(stacked experts must be [E, 2I, H] and [E, H, I])")
            mine = narrow(loaded, 0, self.expert_start, self.num_local_experts)
            param = getattr(self, name)
            if name == "w13":  # gate rows [0, I), up rows [I, 2I): this rank's slice of each
                param[:, :local].copy_(mine.narrow(1, start, local))
                param[:, local:].copy_(mine.narrow(1, inter + start, local))
            else:
                param.copy_(mine.narrow(2, start, local))
            return name
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: this layer has {self.num_experts} experts")
        name, shard = EXPERT_SHARDS[proj]
        full = (inter, self.hidden_size) if shard is not None else (self.hidden_size, inter)
        if tuple(loaded.shape) != full:
            raise ValueError(f"shape mismatch: expert {expert} {proj} {tuple(loaded.shape)} vs expected {full}")
        if not self.is_local(expert):
            return None
        dst = getattr(self, name)[expert - self.expert_start]
        if shard is not None:  # gate or up: rows [start, start + local) of the expert's [I, H]
            dst = dst.narrow(0, shard * local, local)
            dst.copy_(narrow(loaded, 0, start, local))
        else:  # down [H, I]: columns [start, start + local)
            dst.copy_(narrow(loaded, 1, start, local))
        return name


def linear_params(model: nn.Module) -> tuple[int, int]:
    """(all, routed experts'): the logical weights of ``model``'s linear layers, in_features x out_features
    each whatever their storage (a 4-bit or FP8 weight counts its logical shape), the routers and the
    experts' stacked weights included. Pass the decoder stack: a quantized LM head is a linear layer
    too, and callers count the head apart. A token's multiply-adds are all of them but the experts it is
    not routed to."""
    total = experts = 0
    for m in model.modules():
        if isinstance(m, FusedMoE):
            n = m.num_local_experts * 3 * m.local_intermediate * m.hidden_size
            total, experts = total + n, experts + n
        elif isinstance(m, Linear | QuantizedLinear):
            total += m.in_features * m.out_features
        elif isinstance(m, MoeRouter):
            total += m.weight.numel()
    return total, experts


def expert_weight_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' stacked weights in ``model`` (0 for a dense model)."""
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, FusedMoE)
               for p in (m.w13, m.w2))
