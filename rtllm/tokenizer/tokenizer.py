"""Tokenizer: a ``tokenizers.Tokenizer`` plus the special-token and chat-template facts around it.

Built from a Hugging Face directory (``from_pretrained``) or from GGUF metadata (``from_gguf``).
Invariants:

- ``encode`` never truncates or pads; with ``add_special_tokens`` it adds BOS exactly once when the
  config asks for it (the backend's post-processor may already add it; it is never doubled);
- ``decode`` is the backend's decode, without transformers' lossy ``clean_up_tokenization_spaces``;
  for byte-level BPE ``decode(encode(s, add_special_tokens=False)) == s``;
- ``eos_token_ids`` is the union of: the tokenizer's EOS token; GGUF ``eot``/``eom`` ids;
  ``generation_config.json`` and ``config.json`` ``eos_token_id`` (int or list); and any end-of-turn
  marker in ``END_OF_TURN_MARKERS`` that the chat template writes and the vocabulary has as a
  special token (``<|im_end|>`` for ChatML). A model may then stop at the end of its turn even when
  its config names only ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

from rtllm.errors import InvalidRequestError, ModelLoadError
from rtllm.models.gguf_reader import GGUFTokenizerData, load_gguf_tokenizer
from rtllm.tokenizer.chat_template import compile_chat_template, render_chat_template

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")

# llama.cpp ``tokenizer.ggml.pre`` -> how the text is split before byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GPT2, _PRE_DIGITS, _PRE_LLAMA3, _PRE_QWEN2 = "gpt2", "digits", "llama3", "qwen2"
GGUF_PRE_TOKENIZERS = {
    "default": _PRE_GPT2, "gpt2": _PRE_GPT2,
    "smollm": _PRE_DIGITS, "starcoder": _PRE_DIGITS, "refact": _PRE_DIGITS,
    "llama-bpe": _PRE_LLAMA3, "llama3": _PRE_LLAMA3,
    "qwen2": _PRE_QWEN2,
}
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level_pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    if kind in (_PRE_GPT2, _PRE_DIGITS):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if kind == _PRE_GPT2:
            return byte_level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _LLAMA3_SPLIT if kind == _PRE_LLAMA3 else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_gguf_backend(data: GGUFTokenizerData) -> tokenizers.Tokenizer:
    """A ``tokenizers`` byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` metadata.

    CONTROL tokens become special added tokens (skipped by ``decode(skip_special_tokens=True)``);
    USER_DEFINED tokens become non-special added tokens: matched whole in the input and always
    decoded, which is how llama.cpp treats them (e.g. Qwen's ``<tool_call>`` stays in the text).
    """
    where = data.source or "GGUF metadata"
    if not data.model or not data.tokens:
        raise ModelLoadError(f"{where}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    if data.model != "gpt2":
        raise ModelLoadError(
            f"{where}: GGUF tokenizer.ggml.model={data.model!r} is not supported (only 'gpt2' byte-level "
            "BPE; SentencePiece 'llama' vocabularies are not implemented): pass a Hugging Face tokenizer "
            "directory instead")
    kind = GGUF_PRE_TOKENIZERS.get(data.pre or "default")
    if kind is None:
        raise ModelLoadError(f"{where}: GGUF tokenizer.ggml.pre={data.pre!r} is not supported; "
                             f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    vocab = {tok: i for i, tok in enumerate(data.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in data.merges or ()]
    model = tokenizers.models.BPE(vocab, merges, ignore_merges=kind == _PRE_LLAMA3)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(kind)
    backend.decoder = decoders.ByteLevel()
    if kind == _PRE_QWEN2:
        backend.normalizer = normalizers.NFC()
    types = data.token_types or []
    backend.add_special_tokens([AddedToken(data.tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _CONTROL])
    backend.add_tokens([AddedToken(data.tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _USER_DEFINED])
    return backend


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path!r}: {e}") from e
    return value if isinstance(value, dict) else {}


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map: str or {"content": str}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model (see module docstring)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.source = source
        backend.no_truncation()
        backend.no_padding()
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.add_eos_token = add_eos_token and self.eos_token_id is not None
        empty = backend.encode("", add_special_tokens=True).ids
        self._post_adds_bos = bool(empty) and empty[0] == self.bos_token_id
        self._post_adds_eos = bool(empty) and empty[-1] == self.eos_token_id
        self.chat_template = chat_template or None
        if self.chat_template is not None:
            compile_chat_template(self.chat_template)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        eos = {i for i in extra_eos_token_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        for marker in END_OF_TURN_MARKERS if self.chat_template else ():
            marker_id = backend.token_to_id(marker)
            if marker in self.chat_template and marker_id in self._special_ids:
                eos.add(marker_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        """Load an HF tokenizer directory (transformers v4 or v5 layout), a ``.gguf`` file, or a
        directory without tokenizer.json that holds exactly one ``.gguf`` file."""
        path = os.fspath(path)
        if os.path.isfile(path) and path.endswith(".gguf"):
            return cls.from_gguf(load_gguf_tokenizer(path))
        tokenizer_json = os.path.join(path, "tokenizer.json")
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
        if not os.path.isfile(tokenizer_json) and len(ggufs) == 1:  # a directory holding one GGUF file
            return cls.from_gguf(load_gguf_tokenizer(os.path.join(path, ggufs[0])))
        if not os.path.isfile(tokenizer_json):
            raise ModelLoadError(f"no tokenizer.json in {path!r} (a Hugging Face fast-tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        except Exception as e:
            raise ModelLoadError(f"cannot parse {tokenizer_json!r}: {e}") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        template = None
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        else:
            template = config.get("chat_template") or _read_json(
                os.path.join(path, "chat_template.json")).get("chat_template")
            if isinstance(template, list):  # v4 named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
        extra_eos = _ids(_read_json(os.path.join(path, "generation_config.json")).get("eos_token_id"))
        extra_eos += _ids(_read_json(os.path.join(path, "config.json")).get("eos_token_id"))
        return cls(
            backend,
            bos_token=_token_str(config.get("bos_token")) or _token_str(special_map.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")) or _token_str(special_map.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=template if isinstance(template, str) else None,
            extra_eos_token_ids=extra_eos,
            source=path,
        )

    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        """Build from GGUF metadata (``GGUFCheckpoint.tokenizer``); only byte-level BPE ('gpt2')."""
        backend = build_gguf_backend(data)

        def token(i: int | None) -> str | None:
            return data.tokens[i] if i is not None and 0 <= i < len(data.tokens) else None

        return cls(
            backend,
            bos_token=token(data.bos_token_id),
            eos_token=token(data.eos_token_id),
            add_bos_token=bool(data.add_bos_token),
            add_eos_token=bool(data.add_eos_token),
            chat_template=data.chat_template,
            extra_eos_token_ids=[i for i in (data.eot_token_id, data.eom_token_id) if i is not None],
            source=data.source or "<gguf>",
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids are 0..vocab_size-1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def is_special(self, token_id: int) -> bool:
        """True for special added tokens (the ones ``decode(skip_special_tokens=True)`` drops)."""
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in ``text`` map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and not self._post_adds_bos:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and not self._post_adds_eos:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` to a prompt string (tokenize it with ``encode``; the template writes BOS
        itself where it wants one, so callers usually pass ``add_special_tokens=False``)."""
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                f"the tokenizer from {self.source!r} has no chat template; send a plain prompt instead")
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, bos_token=self.bos_token, eos_token=self.eos_token,
                                    **template_kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos_ids={sorted(self.eos_token_ids)}, chat_template={self.has_chat_template})")


def load_tokenizer(source: str | os.PathLike | GGUFTokenizerData | Tokenizer) -> Tokenizer:
    """A Tokenizer from a path (see ``Tokenizer.from_pretrained``), GGUF metadata, or a Tokenizer."""
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, GGUFTokenizerData):
        return Tokenizer.from_gguf(source)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError(f"tokenizer path {path!r} does not exist")
    return Tokenizer.from_pretrained(path)
