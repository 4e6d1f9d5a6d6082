"""What an engine reports about itself (``PyExecutor.info()``): plain, picklable values that a client
(the executor's proxy in another process, the server, ``rtllm bench``) needs without holding the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rtllm.layers.moe import expert_weight_bytes, linear_params
from rtllm.runtime.model_runner import kv_bytes_per_token

if TYPE_CHECKING:
    from rtllm.runtime.py_executor import PyExecutor


def engine_info(ex: PyExecutor) -> dict[str, Any]:
    """What a client needs to know about this engine without holding it (plain, picklable values):
    the limits a RequestValidator is built from, the end tokens, and where and how it runs."""
    sc, kc = ex.config.scheduler_config, ex.config.kv_cache_config
    mc = ex.model_config
    embed = ex.loaded.model.model.embed_tokens.weight
    linears, expert_params = linear_params(ex.loaded.model.model)  # the decoder stack: the LM head apart
    return {
        "model": ex.config.model,
        "architecture": mc.architecture,
        "num_layers": mc.num_hidden_layers,
        "num_heads": mc.num_attention_heads,
        "head_dim": mc.head_dim,
        "tie_word_embeddings": mc.tie_word_embeddings,
        "embedding_bytes": embed.numel() * embed.element_size(),
        "lm_head_params": _lm_head_params(ex.loaded.model),
        # the linear layers' logical weights (all experts'), what a FLOP bound counts: weight bytes / element
        # size undercounts a quantized model
        "linear_params": linears,
        "expert_params": expert_params,
        "kv_bytes_per_token": kv_bytes_per_token(ex.loaded.model, ex.kv_dtype),
        "kv_cache_dtype": str(ex.kv_dtype).removeprefix("torch."),
        "startup": dict(ex.startup),
        "device": str(ex.device),
        "tensor_parallel_size": ex.mapping.tp_size if ex.mapping is not None else 1,
        "pipeline_parallel_size": ex.mapping.pp_size if ex.mapping is not None else 1,
        "num_micro_batches": ex.num_micro_batches,
        "dtype": str(ex.loaded.dtype).removeprefix("torch."),
        "vocab_size": ex.model_config.vocab_size,
        "max_seq_len": sc.max_seq_len,
        "kv_capacity_tokens": ex.kv.capacity_tokens,
        "num_kv_blocks": ex.kv.num_blocks - 1,
        "tokens_per_block": kc.tokens_per_block,
        "eos_token_ids": sorted(ex.eos_token_ids),
        "weight_bytes": ex.loaded.weight_bytes,
        # MoE: the routed experts' part of weight_bytes (a decode step reads the experts it routes to)
        "num_experts": mc.num_experts,
        "experts_per_tok": mc.num_experts_per_tok,
        "expert_bytes": expert_weight_bytes(ex.loaded.model),
        "load_seconds": ex.loaded.load_seconds,
    }


def _lm_head_params(model) -> int:
    """The LM head's logical weights on this rank, as ``linear_params`` counts the rest: none on a pipeline
    stage without it, this rank's vocabulary shard when it is split, a quantized head's logical shape."""
    head = getattr(model, "lm_head", None)
    if head is None:
        return 0
    if hasattr(head, "in_features"):
        return head.in_features * head.out_features
    return head.weight.numel()
