"""Incremental detokenization with stop strings, for streaming one request's output.

Text is produced with a sliding window over the ids: ``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])``, where ``ids[:read]`` is already emitted and ``prefix`` is the start of
the previous emitted chunk (context for decoders that strip or merge at the start). A chunk is held
back while its decoded text ends in U+FFFD, i.e. while a multi-byte character is still split across
tokens. Invariants:

- ``text`` only grows until a stop string matches; it is then cut at the start of the stop string
  (or just after it with ``include_stop_str_in_output``) and later ``append`` calls are ignored.
  A stop matches as soon as it is complete in the text; if one token completes several, the one
  starting earliest wins (so with stops "f" and "def!" the text "def!" stops at "f");
- ``pop_delta`` never returns text that could still turn out to be the start of a stop string, so
  no streamed delta is ever retracted;
- the concatenation of every ``pop_delta()`` and the final ``finish()`` equals the final ``text``;
  without a stop match that is ``tokenizer.decode(all appended ids)``;
- no delta contains a U+FFFD produced by splitting a character; ``finish`` flushes a genuinely
  incomplete tail (the stream ended mid-character) exactly as ``decode`` renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rtllm.errors import InvalidRequestError

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into stable text, checking stop strings (see module docstring)."""

    def __init__(
        self,
        tokenizer: _Decoder,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_str_in_output
        self._ids: list[int] = []
        self._prefix = 0  # window start: beginning of the previously emitted chunk
        self._read = 0  # ids[:read] are decoded into text
        self._sent = 0  # text[:sent] has been returned by pop_delta/finish
        self.text = ""
        self.stop_reason: str | None = None
        self.finished = False

    @property
    def token_ids(self) -> list[int]:
        """Every id appended before a stop string matched (a copy)."""
        return list(self._ids)

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _advance(self, flush: bool) -> None:
        prefix_text = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix, len(self._ids))
        if len(full) <= len(prefix_text) and not flush:
            return  # nothing new yet (e.g. a skipped special token): keep the window as is
        if full.endswith(_REPLACEMENT) and not flush:
            return  # a multi-byte character is still incomplete
        new = full[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        if new:
            self._extend(new)

    def _extend(self, new: str) -> None:
        old_len = len(self.text)
        self.text += new
        if not self._stops:
            return
        start = max(0, old_len - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self.text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is not None:
            pos, stop = best
            self.text = self.text[: pos + len(stop) if self._include_stop else pos]
            self.stop_reason = stop
            self.finished = True

    def append(self, token_id: int) -> None:
        """Add one generated id; ignored once a stop string matched or after ``finish``."""
        if self.finished:
            return
        self._ids.append(token_id)
        self._advance(flush=False)

    def _withheld(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        if self.finished or not self._stops:
            return 0
        text = self.text
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0

    def pop_delta(self) -> str:
        """Text that became safe to show since the last call (may be empty)."""
        end = max(self._sent, len(self.text) - self._withheld())
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def finish(self) -> str:
        """End of stream: flush an incomplete character and any withheld text; return the rest."""
        if not self.finished:
            if self._read < len(self._ids):
                self._advance(flush=True)
            self.finished = True
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta
