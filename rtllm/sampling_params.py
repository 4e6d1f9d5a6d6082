"""SamplingParams: how one request picks its tokens and when it stops.

Lives below every layer (the runtime samples with it, the user API builds it), and
validates itself on construction so a bad value fails where it enters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rtllm.errors import InvalidRequestError
from rtllm.logits_processors import check_entry

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options (TensorRT-LLM / vLLM names).

    temperature 0 means greedy. ``max_tokens`` None means "up to the context length".
    ``stop`` strings are matched on the detokenized text across token boundaries and
    trimmed from the output; ``stop_token_ids`` stop on a sampled id (kept in token_ids,
    not shown in text). ``logprobs`` = k returns the top-k log-probabilities of every
    generated position (plus the sampled token's); ``prompt_logprobs`` the same for prompt
    positions. ``n`` samples share the prompt's KV blocks through the prefix cache.
    ``logits_processors``: per-request edits of the logits, run in the engine's process before
    penalties and sampling (callables, registered names, import paths: rtllm.logits_processors).
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logits_processors: list | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise bad("max_tokens", "must be a positive integer (or None for the context limit)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.min_p, int | float) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if not isinstance(self.repetition_penalty, int | float) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= _MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {_MAX_LOGPROBS}] or None")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop):
            self.stop_strings = list(self.stop)
        else:
            raise bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop_strings):
            raise bad("stop", "stop strings must be non-empty")
        if self.stop_token_ids is not None and not (
            isinstance(self.stop_token_ids, list) and all(isinstance(t, int) for t in self.stop_token_ids)
        ):
            raise bad("stop_token_ids", "must be a list of integers")
        if self.logits_processors is not None:
            if not isinstance(self.logits_processors, list | tuple):
                raise bad("logits_processors", "must be a list (of callables, names or {'name', 'kwargs'} dicts)")
            self.logits_processors = list(self.logits_processors)
            for entry in self.logits_processors:
                check_entry(entry)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_logits_processors(self) -> bool:
        return bool(self.logits_processors)

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
