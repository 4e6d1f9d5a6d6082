"""Mixtral: the Llama decoder with a sparse mixture-of-experts MLP in every layer.

Routing: softmax over the router logits, top-k (2 for Mixtral-8x7B), renormalized. The attention,
norms, embedding and LM head are the Llama family's (rtllm.models.llama); only the MLP and the
experts' checkpoint names differ. ``Qwen3MoeForCausalLM`` (rtllm.models.qwen3_moe) is this class
with Qwen3's q/k norm and its own routing flags, all read from ModelConfig.

Checkpoint names taken: ``block_sparse_moe.gate`` / ``mlp.gate`` (router), per-expert
``experts.N.{w1,w3,w2}`` (Mixtral) or ``experts.N.{gate,up,down}_proj`` (Qwen3-MoE), and the stacked
``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]`` of transformers 5's modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rtllm.layers.moe import EXPERT_SHARDS, FusedMoE
from rtllm.models.llama import LlamaForCausalLM
from rtllm.models.registry import register_model

_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp)\.experts\.(?:(?P<idx>\d+)\.(?P<proj>\w+)\.weight|"
                     r"(?P<stacked>gate_up_proj|down_proj))$")


@register_model("MixtralForCausalLM")
class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, layer_idx: int) -> nn.Module | None:
        cfg = self.config
        if not cfg.is_moe_layer(layer_idx):
            return None  # a dense Llama MLP of intermediate_size (Qwen3-MoE's mlp_only_layers)
        return FusedMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                        renormalize=cfg.norm_topk_prob, mapping=cfg.mapping)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Experts go into their layer's stacked w13 / w2; everything else loads as in the Llama family.
        A stacked parameter counts as loaded once every part of every expert this rank holds has
        arrived. Split across ranks: other stages' layers and other ranks' experts are skipped unread."""
        modules = dict(self.named_modules())
        parts: dict[str, set] = {}  # stacked parameter name -> the (expert, shard) parts seen

        def dense(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in stream:
                target = name.replace(".block_sparse_moe.", ".mlp.")
                m = _EXPERT.match(target)
                if m is None:
                    yield target, tensor
                    continue
                if self.model.pipelined and self._stage_target(target) is None:
                    continue  # a layer of another pipeline stage
                moe = modules.get(m["prefix"])
                proj = m["stacked"] or m["proj"]
                if not isinstance(moe, FusedMoE) or (m["proj"] and proj not in EXPERT_SHARDS):
                    raise KeyError(name)
                expert = None if m["stacked"] else int(m["idx"])
                try:
                    pname = moe.load_expert(proj, tensor, expert)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from e
                if pname is None:
                    continue  # an expert held by another rank (expert parallel)
                shard = EXPERT_SHARDS[proj][1] if expert is not None else None
                parts.setdefault(f"{m['prefix']}.{pname}", set()).add("all" if expert is None else (expert, shard))

        loaded = super().load_weights(dense(weights))
        for pname, seen in parts.items():
            moe = modules[pname.rpartition(".")[0]]
            need = moe.num_local_experts * (2 if pname.endswith(".w13") else 1)
            if "all" in seen or len(seen) == need:
                loaded.add(pname)
        return loaded
