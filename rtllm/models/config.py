"""ModelConfig: the fields the engine needs, read from a Hugging Face config.json.

Accepts both transformers generations: v4 writes ``torch_dtype``, top-level ``rope_theta``
and ``rope_scaling``; v5 writes ``dtype`` and ``rope_parameters`` and may write
``head_dim: null``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from rtllm.errors import ModelLoadError
from rtllm.parallel.mapping import Mapping

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    architectures: list[str]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # mixture of experts (0 experts: a dense model). Mixtral spells the count num_local_experts,
    # Qwen3-MoE num_experts; Mixtral's experts are intermediate_size wide and always renormalized.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # which slice of the model this process holds (tensor / pipeline parallel); set by load_model
    mapping: Mapping = field(default_factory=Mapping)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule: a sparse MLP unless listed in mlp_only_layers or off the sparse step."""
        return (self.is_moe and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        def need(key: str):
            if key not in cfg or cfg[key] is None:
                raise ModelLoadError(f"{source}: required field {key!r} is missing")
            return cfg[key]

        archs = cfg.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ModelLoadError(f"{source}: 'architectures' must be a non-empty list, got {archs!r}")
        try:
            hidden = int(need("hidden_size"))
            heads = int(need("num_attention_heads"))
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rope = cfg.get("rope_parameters") or {}
            rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            eos = cfg.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            model_type = str(cfg.get("model_type", ""))
            num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            out = cls(
                architectures=list(archs),
                model_type=model_type,
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_hidden_layers=int(need("num_hidden_layers")),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type.startswith("qwen3"),
                torch_dtype=parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype"), torch.float32),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                num_experts=num_experts,
                num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
                moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
                if num_experts else 0,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", model_type == "mixtral")),
                decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
                mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []],
                raw=cfg,
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: malformed field: {e}") from e
        if heads % kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a multiple of "
                                 f"num_key_value_heads={kv_heads}")
        if num_experts and not 0 < out.num_experts_per_tok <= num_experts:
            raise ModelLoadError(f"{source}: num_experts_per_tok={out.num_experts_per_tok} must be in "
                                 f"1..{num_experts} (the number of experts)")
        return out

    @classmethod
    def from_file(cls, path: str) -> ModelConfig:
        try:
            with open(path) as f:
                cfg = json.load(f)
        except FileNotFoundError as e:
            raise ModelLoadError(f"no config.json in {os.path.dirname(path)!r}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_dict(cfg, source=path)
