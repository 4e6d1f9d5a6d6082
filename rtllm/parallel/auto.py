"""``tensor_parallel_size="auto"``: the smallest tensor-parallel size that fits the model on the GPUs.

Given the model's config (anything with ModelConfig's field names), its weight bytes, the KV bytes
of one token and the free memory of each visible GPU, ``choose_tp`` tries tp = 1, 2, 4, ... (world =
tp * pp ranks, one GPU each, ranks on GPUs 0..world-1 as the executor places them) and returns the
first that

- fits the model's shape (``Mapping.validate_for``: heads, KV heads, MLP width, layers, experts), and
- fits in memory: on every GPU used, weights / (tp * pp) plus the KV cache of ``kv_tokens`` tokens
  (one max_seq_len request at least) for this rank's heads and layers is at most
  ``usable_fraction`` of its free memory (the rest: activations, the CUDA context, NCCL buffers).

The per-rank estimate splits every weight evenly (the small replicated parts, norms and biases, are
left out; KV heads are replicated once tp exceeds them, so a rank's KV never drops below one head).
Nothing fits: a ConfigError listing each candidate's need against the smallest free memory.

``model_weight_bytes`` counts the parameters of a Llama-family / MoE config (embedding, attention,
MLP or experts with their router, norms, LM head unless tied) at a dtype's bytes; quantized linear
layers count their packed bytes and scales (``QUANT_BYTES_PER_PARAM``), the embedding and LM head
stay at the dtype's (a slight over-estimate when they are quantized too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rtllm.errors import ConfigError
from rtllm.parallel.mapping import Mapping

GiB = 2**30

# bytes per weight of a quantized linear layer, scales included (group: input channels per scale)
QUANT_BYTES_PER_PARAM = {
    "FP8": lambda group: 1.0,  # e4m3 (+ one fp32 scale per output row: left out)
    "W8A16": lambda group: 1.0,
    "W4A16": lambda group: 0.5 + 4.0 / (group or 128),  # int4 + a 16-bit scale and zero per group
    "W4A16_AWQ": lambda group: 0.5 + 4.0 / (group or 128),
    "NVFP4": lambda group: 0.5 + 1.0 / 16,  # e2m1 + an e4m3 scale per 16
}


def linear_bytes_per_param(dtype_bytes: float, quant_algo: str | None = None, group_size: int | None = None) -> float:
    """Bytes per weight of a linear layer: the dtype's, or the quantized format's."""
    if quant_algo is None:
        return float(dtype_bytes)
    if quant_algo not in QUANT_BYTES_PER_PARAM:
        raise ConfigError(f"no weight size known for quant_algo={quant_algo!r}")
    return QUANT_BYTES_PER_PARAM[quant_algo](group_size)


def model_weight_bytes(config, dtype_bytes: float, linear_bytes: float | None = None) -> int:
    """Weight bytes of the whole model from its config: embedding, LM head (unless tied) and norms at
    ``dtype_bytes``, linear layers (attention, MLP, experts; MoE routers stay dense) at ``linear_bytes``
    (default: ``dtype_bytes``)."""
    lb = dtype_bytes if linear_bytes is None else linear_bytes
    h, v, d = config.hidden_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads, config.num_key_value_heads
    experts = getattr(config, "num_experts", 0) or 0
    dense = (v * h) * (1 if config.tie_word_embeddings else 2) + h  # embedding, LM head, final norm
    linear = 0
    for i in range(config.num_hidden_layers):
        linear += h * (q + 2 * kv) * d + q * d * h  # q|k|v and o
        dense += 2 * h  # the two RMSNorms
        if getattr(config, "attention_bias", False):
            dense += (q + 2 * kv) * d
        if getattr(config, "qk_norm", False):
            dense += 2 * d
        is_moe = experts and (config.is_moe_layer(i) if hasattr(config, "is_moe_layer") else True)
        if is_moe:
            linear += experts * 3 * h * config.moe_intermediate_size
            dense += h * experts  # the router
        else:
            linear += 3 * h * config.intermediate_size
    return int(dense * dtype_bytes + linear * lb)


def kv_bytes_per_token(config, kv_dtype_bytes: float) -> int:
    """K and V of one token over every layer (all KV heads)."""
    return int(2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_dtype_bytes)


@dataclass
class TpChoice:
    tp: int
    weight_bytes: int  # the whole model
    kv_bytes: int  # the KV budget of the whole model (kv_tokens tokens)
    per_gpu_bytes: int  # what one GPU needs at this tp
    free_bytes: int  # the smallest free memory of the GPUs it uses
    usable_bytes: int  # free_bytes * usable_fraction
    tried: list[str]  # why smaller sizes were passed over

    def describe(self) -> str:
        skipped = f"; passed over: {'; '.join(self.tried)}" if self.tried else ""
        return (f"tensor_parallel_size='auto' -> {self.tp}: weights {self.weight_bytes / GiB:.2f} GiB + KV "
                f"{self.kv_bytes / GiB:.2f} GiB, {self.per_gpu_bytes / GiB:.2f} GiB per GPU <= "
                f"{self.usable_bytes / GiB:.2f} GiB usable of {self.free_bytes / GiB:.2f} GiB free{skipped}")


def per_gpu_bytes(tp: int, pp: int, weight_bytes: int, kv_bytes: int, num_kv_heads: int) -> int:
    """One rank's share: weights split over tp * pp, KV split over pp stages and over tp by heads
    (a rank holds at least one KV head)."""
    kv_split = min(tp, num_kv_heads) if num_kv_heads else tp
    return math.ceil(weight_bytes / (tp * pp)) + math.ceil(kv_bytes / (kv_split * pp))


def visible_gpu_free_bytes() -> list[int]:
    """Free memory of each visible GPU: from NVML when it answers (no CUDA context in this process, whose
    memory the engine's ranks would lose), else torch.cuda.mem_get_info (a context on each GPU)."""
    n = torch.cuda.device_count()
    try:
        return [torch.cuda.get_device_properties(i).total_memory - torch.cuda.device_memory_used(i) for i in range(n)]
    except Exception:  # no pynvml
        return [torch.cuda.mem_get_info(i)[0] for i in range(n)]


def choose_tp(config, weight_bytes: int, kv_bytes_per_token: int, kv_tokens: int, free_bytes: list[int],
              pp_size: int = 1, usable_fraction: float = 0.9, moe_tp_size: int | None = None,
              moe_ep_size: int | None = None) -> TpChoice:
    """The smallest power-of-two tp whose ranks fit (see the module docstring). ``free_bytes``: free
    memory of each visible GPU, GPU 0 first. ``moe_*_size``: as given to the Mapping (None: defaults)."""
    if not free_bytes:
        raise ConfigError("tensor_parallel_size='auto' needs GPUs: none is visible (give a number instead)")
    kv_bytes = kv_bytes_per_token * kv_tokens
    tried: list[str] = []
    tp = 1
    while tp * pp_size <= len(free_bytes):
        world = tp * pp_size
        try:
            Mapping(world, tp, pp_size, moe_tp_size, moe_ep_size).validate_for(config)
        except ConfigError as e:
            tried.append(f"tp={tp}: {e}")
            tp *= 2
            continue
        need = per_gpu_bytes(tp, pp_size, weight_bytes, kv_bytes, config.num_key_value_heads)
        free = min(free_bytes[:world])
        usable = int(free * usable_fraction)
        if need <= usable:
            return TpChoice(tp, weight_bytes, kv_bytes, need, free, usable, tried)
        tried.append(f"tp={tp}: needs {need / GiB:.2f} GiB per GPU, {usable / GiB:.2f} GiB usable "
                     f"({usable_fraction:g} of {free / GiB:.2f} GiB free on the smallest of GPUs 0..{world - 1})")
        tp *= 2
    raise ConfigError(f"tensor_parallel_size='auto': the model does not fit on the {len(free_bytes)} visible GPU(s) "
                      f"with pipeline_parallel_size={pp_size} (weights {weight_bytes / GiB:.2f} GiB, KV for "
                      f"{kv_tokens} tokens {kv_bytes / GiB:.2f} GiB): " + "; ".join(tried))
