"""Render Hugging Face chat templates (Jinja) the way transformers does.

The environment matches transformers' ``apply_chat_template``: an ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a pass-through
``{% generation %}`` block, ``raise_exception`` and ``strftime_now`` globals and a ``tojson`` filter
that does not HTML-escape. Invariants: messages are validated before rendering, and every failure a
request can cause (bad message, template ``raise_exception``, undefined access) raises
:class:`~rtllm.errors.InvalidRequestError`; a template that does not compile raises
:class:`~rtllm.errors.ModelLoadError` (it is the checkpoint that is broken).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rtllm.errors import InvalidRequestError, ModelLoadError

ROLES = frozenset({"system", "user", "assistant", "tool"})


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; render as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (and cache) a chat template; a syntax error raises ModelLoadError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def validate_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the OpenAI-style message list; return it as a list of dicts (not copied deeply).

    Each message is a dict with ``role`` in system/user/assistant/tool and a string ``content``;
    an assistant message that carries ``tool_calls`` may have ``content`` None or absent.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidRequestError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role={role!r} is not one of {', '.join(sorted(ROLES))}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string, got {type(content).__name__}")
    return list(messages)


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Validate ``messages`` and render ``template`` with them; extra kwargs become template variables."""
    messages = validate_messages(messages)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InvalidRequestError("tools must be a list of JSON-schema dicts")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"chat template rejected the messages: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise InvalidRequestError(f"chat template failed on these messages: {e!r}") from e
