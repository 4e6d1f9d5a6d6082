"""Tokenization below the executor: HF / GGUF tokenizers, chat templates, incremental detokenizing.

Imports only ``rtllm.models`` (the GGUF reader; the calibration hook) and ``rtllm.errors`` from the engine.
"""

from rtllm.models.calibration import register_calibration_tokenizer
from rtllm.tokenizer.chat_template import render_chat_template, validate_messages
from rtllm.tokenizer.detokenizer import IncrementalDetokenizer
from rtllm.tokenizer.tokenizer import (
    END_OF_TURN_MARKERS,
    GGUF_PRE_TOKENIZERS,
    Tokenizer,
    build_gguf_backend,
    load_tokenizer,
)

# W4A16_AWQ calibrates on text while the model loads, below this layer: give it an encoder
register_calibration_tokenizer(lambda source: load_tokenizer(source).encode)

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
