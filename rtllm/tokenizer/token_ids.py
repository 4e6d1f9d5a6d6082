"""A tokenizer for models that have none (random-weight benchmark models): prompts are token ids."""

from __future__ import annotations

from collections.abc import Sequence

from rtllm.errors import InvalidRequestError


class TokenIdTokenizer:
    """Accepts token-id prompts only; decodes each id ``i`` to the text ``" i"``.

    Lets the engine serve a model built from a bare config.json, where only token counts matter.
    Every token still has visible text, so streaming sends one delta per token and serving
    benchmarks measure inter-token latency as with a real tokenizer.
    """

    chat_template = None
    has_chat_template = False
    bos_token_id = None

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.source = "<token ids>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidRequestError("this model has no tokenizer (built from a bare config): pass token-id prompts")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def is_special(self, token_id: int) -> bool:
        return False

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kw) -> str:
        raise InvalidRequestError("this model has no tokenizer and no chat template")
