"""Tokenization below the executor: HF / GGUF tokenizers, chat templates, incremental detokenizing.

Imports only ``rtllm.models.gguf_reader`` and ``rtllm.errors`` from the engine.
"""

from rtllm.tokenizer.chat_template import render_chat_template, validate_messages
from rtllm.tokenizer.detokenizer import IncrementalDetokenizer
from rtllm.tokenizer.tokenizer import (
    END_OF_TURN_MARKERS,
    GGUF_PRE_TOKENIZERS,
    Tokenizer,
    build_gguf_backend,
    load_tokenizer,
)

__all__ = [
    "END_OF_TURN_MARKERS",
    "GGUF_PRE_TOKENIZERS",
    "IncrementalDetokenizer",
    "Tokenizer",
    "build_gguf_backend",
    "load_tokenizer",
    "render_chat_template",
    "validate_messages",
]
