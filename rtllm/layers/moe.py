"""Mixture-of-experts MLP: a router and E gated experts held as two stacked tensors.

``FusedMoE`` computes, for each token, ``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over its
top-k experts e (softmax over the router logits, top-k, optionally renormalized). Expert weights
live stacked, ``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]``, so the grouped
GEMM kernel (rtllm.kernels.moe) runs all experts in one launch.

Checkpoints store experts one tensor each (``experts.N.gate_proj`` / ``w1``, ...) or already
stacked (transformers 5 in memory: ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj``);
``load_expert`` takes either.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.kernels import gemm
from rtllm.kernels import moe as moe_kernels

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


class FusedMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"FusedMoE: top_k={top_k} must be in 1..num_experts={num_experts}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = MoeRouter(hidden_size, num_experts)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x.dtype."""
        topk_weights, topk_ids = moe_kernels.fused_topk(self.gate(x), self.top_k, self.renormalize)
        return moe_kernels.fused_experts(x, self.w13, self.w2, topk_weights, topk_ids)

    @torch.no_grad()
    def load_expert(self, proj: str, loaded: torch.Tensor, expert: int | None = None) -> str:
        """Copy one checkpoint tensor into the stacked weights; returns the parameter's name.

        ``proj``: a key of EXPERT_SHARDS with ``expert`` the expert's index, or a stacked
        ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] with ``expert`` None."""
        inter = self.intermediate_size
        if expert is None:
            name = {"gate_up_proj": "w13", "down_proj": "w2"}.get(proj)
            if name is None:
                raise ValueError(f"stacked expert tensor {proj!r}: expected gate_up_proj or down_proj")
            param = getattr(self, name)
            if loaded.shape != param.shape:
                raise ValueError(f"shape mismatch: {proj} {tuple(loaded.shape)} vs {name} {tuple(param.shape)} "
                                 "(stacked experts must be [E, 2I, H] and [E, H, I])")
            param.copy_(loaded)
            return name
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: this layer holds {self.num_experts} experts")
        name, shard = EXPERT_SHARDS[proj]
        dst = getattr(self, name)[expert]
        if shard is not None:
            dst = dst.narrow(0, shard * inter, inter)
        if loaded.shape != dst.shape:
            raise ValueError(f"shape mismatch: expert {expert} {proj} {tuple(loaded.shape)} vs {tuple(dst.shape)}")
        dst.copy_(loaded)
        return name


def expert_weight_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' stacked weights in ``model`` (0 for a dense model)."""
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, FusedMoE)
               for p in (m.w13, m.w2))
