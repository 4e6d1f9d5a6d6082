"""OpenAI API request schemas (pydantic) and the errors the server answers with.

Requests follow the OpenAI API reference field by field, plus the vLLM extensions that
clients commonly send (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, ...).
Validation is strict (no "1" -> 1 coercion). A field the engine does not implement is never
ignored: ``unsupported_fields`` names it and the server answers 400. Unknown fields are
rejected the same way (a typo must not silently change sampling).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "ValidationError", "describe_validation_error",
           "unsupported_fields"]


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


Prob = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Prob | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id: logged with the request, not used otherwise
    # vLLM-style extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


# OpenAI fields rtllm does not implement: accepted only at the value that means "off".
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # meaningful only with tools
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}


def unsupported_fields(req: _SamplingFields) -> list[str]:
    """Names of fields in the request body that this server would have to ignore."""
    bad = []
    for name, value in (req.model_extra or {}).items():
        off = _OFF_VALUES.get(name)
        if off is None:
            bad.append(f"{name} (unknown parameter)")
        elif not any(value == v and type(value) is type(v) for v in off):
            bad.append(f"{name} (not supported by this server)")
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        bad.append("echo together with logprobs (not supported by this server)")
    return bad


def describe_validation_error(e: ValidationError) -> tuple[str, str | None]:
    """One readable sentence per problem and the first offending field's dotted path."""
    parts, first = [], None
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"] if not _is_type_tag(x))
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts), first


def _is_type_tag(x: object) -> bool:
    # pydantic puts the union member tried into the location ("str", "list[int]", ...)
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x
                                   or x.startswith("function-") or x in ("TextPart",))
