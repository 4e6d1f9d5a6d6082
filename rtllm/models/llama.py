"""The Llama family: Llama (incl. Llama-3 rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

They differ only in flags read from ModelConfig, so one module serves all four. Written against
rtllm.layers only; the forward takes a flat token batch plus AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from rtllm.layers.activation import SiluAndMul, gated_up
from rtllm.layers.attention import Attention
from rtllm.layers.attention_metadata import AttentionMetadata
from rtllm.layers.linear import default_weight_loader
from rtllm.layers.norm import RMSNorm
from rtllm.layers.parallel_linear import lm_head, merged_column_linear, qkv_linear, row_linear, vocab_embedding
from rtllm.layers.quant.fp8 import FP8Activation
from rtllm.layers.rope import RotaryEmbedding
from rtllm.models.config import ModelConfig
from rtllm.models.registry import register_model
from rtllm.parallel.weights import LazyTensor


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        m = cfg.mapping  # tensor parallel: this rank's heads (KV heads replicated when tp > num_kv_heads)
        self.num_heads = cfg.num_attention_heads // m.tp_size
        self.num_kv_heads = m.kv_heads_per_rank(cfg.num_key_value_heads)
        self.head_dim = cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.model_type == "qwen2"
        o_bias = cfg.attention_bias and cfg.model_type != "qwen2"
        self.qkv_proj = qkv_linear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   qkv_bias, m)
        self.o_proj = row_linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, o_bias, m)
        qk_norm = None
        if cfg.qk_norm:  # applied by the attention layer, in its RoPE + cache-write kernel
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            qk_norm = (self.q_norm, self.k_norm)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, rotary, qk_norm)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | FP8Activation,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        return self.o_proj(self.attn(positions, q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = merged_column_linear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, cfg.mapping)
        self.down_proj = row_linear(cfg.intermediate_size, cfg.hidden_size, False, cfg.mapping)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor | FP8Activation) -> torch.Tensor:
        return self.down_proj(gated_up(self.gate_up_proj, self.act, x, consumer=self.down_proj))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = LlamaMLP(cfg) if mlp is None else mlp  # another MLP (MoE) from a subclass's make_mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        # each norm is told the linear layer its output feeds: an FP8 one gets it quantized by the norm
        qkv_proj = self.self_attn.qkv_proj
        if residual is None:
            residual = x
            h = self.input_layernorm(x, consumer=qkv_proj)
        else:
            h, residual = self.input_layernorm(x, residual, consumer=qkv_proj)
        h = self.self_attn(positions, h, meta)
        mlp_in = self.mlp.gate_up_proj if isinstance(self.mlp, LlamaMLP) else None  # (an MoE block: None)
        h, residual = self.post_attention_layernorm(h, residual, consumer=mlp_in)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int,
                 make_mlp: Callable[[int], nn.Module | None] | None = None) -> None:
        super().__init__()
        m = cfg.mapping
        # pipeline parallel: this stage's decoder layers (the others are empty placeholders, so parameter
        # names keep their layer index); the embedding lives on the first stage, the final norm on the last
        self.layer_range = m.pp_layers(cfg.num_hidden_layers)
        self.pipelined = m.pp_size > 1
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, m) if m.is_first_pp_rank() else None
        # One rotary table shared by every layer.
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary, make_mlp and make_mlp(i))
                                    if i in self.layer_range else nn.Identity() for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if m.is_last_pp_rank() else None

    def stage_layers(self) -> Iterable[nn.Module]:
        return (self.layers[i] for i in self.layer_range) if self.pipelined else self.layers

    def forward(self, input_ids, positions, meta, hidden=None):
        """``hidden``: the previous pipeline stage's output (on the stages after the first). Returns the
        final normed hidden states on the last stage, the residual stream (x + residual) on the others."""
        x = self.embed_tokens(input_ids) if self.embed_tokens is not None else hidden
        residual = None
        for layer in self.stage_layers():
            x, residual = layer(positions, x, residual, meta)
        if self.norm is None:
            return x + residual
        x, _ = self.norm(x, residual)
        return x


@register_model("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
class LlamaForCausalLM(nn.Module):
    # runs split across ranks (tensor and pipeline parallel: rtllm.parallel.Mapping in ModelConfig.mapping)
    supports_parallel = True
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params = [
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    ]

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions or cfg.max_position_embeddings, self.make_mlp)
        self.lm_head = lm_head(cfg.vocab_size, cfg.hidden_size, cfg.mapping) if cfg.mapping.is_last_pp_rank() else None
        if cfg.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, layer_idx: int) -> nn.Module | None:
        """The MLP of layer ``layer_idx``; None: the dense LlamaMLP (subclasses put MoE blocks here)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Flat batch of T tokens -> hidden states [T, hidden] (``hidden``: the previous pipeline stage's)."""
        return self.model(input_ids, positions, meta, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.stage_layers()]

    def _stage_target(self, name: str) -> str | None:
        """Pipeline parallel: the parameter a checkpoint tensor loads into on this stage (None: another
        stage's). The last stage's LM head takes a tied embedding from the embedding's tensor."""
        if name.startswith("model.layers."):
            return name if int(name.split(".")[2]) in self.model.layer_range else None
        if name.startswith("model.embed_tokens."):
            if self.model.embed_tokens is not None:
                return name
            tied = self.config.tie_word_embeddings and self.lm_head is not None
            return "lm_head." + name.removeprefix("model.embed_tokens.") if tied else None
        if name.startswith("model.norm."):
            return name if self.model.norm is not None else None
        if name.startswith("lm_head."):
            return name if self.lm_head is not None else None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if self.model.pipelined and (name := self._stage_target(name)) is None:
                continue
            for ckpt_frag, fused_frag, shard_id in self.stacked_params:
                if f".{ckpt_frag}." in name:
                    target, shard = name.replace(f".{ckpt_frag}.", f".{fused_frag}."), shard_id
                    break
            else:
                target, shard = name, None
            param = params.get(target)
            if param is None:
                raise KeyError(name)
            try:
                loader = getattr(param, "weight_loader", default_weight_loader)
                # a LazyTensor (a rank reading its shard) is cast by the copy into the parameter
                loader(param, tensor if isinstance(tensor, LazyTensor) else tensor.to(param.dtype), shard)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            loaded.add(target)
        return loaded
