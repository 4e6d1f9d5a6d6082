"""A Llama variant: token embeddings scaled by ``embedding_multiplier`` (as IBM Granite does).

Written against rtllm.layers and the Llama model, like a built-in architecture; registered with a
weight-name map because its checkpoints call the decoder ``backbone`` (``backbone.layers.0...``).
"""

from __future__ import annotations

import torch

from rtllm.layers.embedding import VocabEmbedding
from rtllm.models.config import ModelConfig
from rtllm.models.llama import LlamaForCausalLM
from rtllm.models.registry import register_model

ARCHITECTURE = "ScaledEmbeddingLlamaForCausalLM"


class ScaledVocabEmbedding(VocabEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, multiplier: float) -> None:
        super().__init__(vocab_size, hidden_size)
        self.multiplier = multiplier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.multiplier


class ScaledEmbeddingLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__(cfg, max_positions)
        multiplier = float(cfg.raw.get("embedding_multiplier", 1.0))
        self.model.embed_tokens = ScaledVocabEmbedding(cfg.vocab_size, cfg.hidden_size, multiplier)
        if cfg.tie_word_embeddings:  # the LM head reads the unscaled table
            self.lm_head.weight = self.model.embed_tokens.weight


def checkpoint_name(name: str) -> str | None:
    """``backbone.*`` -> ``model.*``; the checkpoint's ``backbone.format_version`` marker is skipped."""
    if name == "backbone.format_version":
        return None
    if name.startswith("backbone."):
        return "model." + name.removeprefix("backbone.")
    return name


def register() -> None:
    register_model(ARCHITECTURE, ScaledEmbeddingLlamaForCausalLM, weight_name_map=checkpoint_name)
