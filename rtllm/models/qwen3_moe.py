"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm) with a sparse MoE MLP (e.g. 128 experts, top 8).

The model is Mixtral's (rtllm.models.mixtral) with flags from ModelConfig: ``norm_topk_prob``
(renormalize the top-k weights or not), and dense MLPs of ``intermediate_size`` in the layers
listed in ``mlp_only_layers`` or off every ``decoder_sparse_step``-th layer; experts are
``moe_intermediate_size`` wide.
"""

from __future__ import annotations

from rtllm.models.mixtral import MixtralForCausalLM
from rtllm.models.registry import register_model


@register_model("Qwen3MoeForCausalLM")
class Qwen3MoeForCausalLM(MixtralForCausalLM):
    pass
