"""The OpenAI-compatible HTTP API: ``create_app(engine_factory, ServerConfig) -> FastAPI``.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /version, GET /metrics. The engine runs in a worker process (the multi-process executor);
this process parses, tokenizes, applies the chat template, detokenizes and streams.

One request's path: auth (/v1 routes, when an API key is set) -> body read with a size cap
(413) -> JSON parse (400) -> strict schema (400 naming the field) -> unsupported or unknown
fields (400 naming them) -> model name (404) -> engine ready (503) -> prompt + max_tokens
against the context (400) -> admission against the queue bound (429 + Retry-After) ->
submit -> stream SSE chunks or wait for the whole answer. A client that disconnects aborts
its request at the engine (its KV blocks are freed at the next step). Every error body is
OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

This module holds the checks up to admission and the routes; rtllm.serve.generation runs an
admitted request, rtllm.serve.formatting builds the response bodies, rtllm.serve.state holds what
the routes share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import rtllm
from rtllm.errors import InvalidRequestError
from rtllm.serve.engine import EngineManager
from rtllm.serve.formatting import ResponseFormatter
from rtllm.serve.generation import generate, sampling_params
from rtllm.serve.metrics import CONTENT_TYPE
from rtllm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ValidationError,
    describe_validation_error,
    unsupported_fields,
)
from rtllm.serve.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]

logger = logging.getLogger("rtllm.serve")
access_log = logging.getLogger("rtllm.serve.access")

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics")




# -- helpers -------------------------------------------------------------------------------------

def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_auth(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_json(state: ServerState, request: Request) -> dict:
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _parse(model_cls, body: dict):
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        msg, param = describe_validation_error(e)
        raise ApiError(400, msg, param=param) from None
    bad = unsupported_fields(req)
    if bad:
        raise ApiError(400, f"unsupported parameters: {', '.join(bad)}", param=bad[0].split(" ")[0])
    return req


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.config.served_model_names:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in state.config.served_model_names)}",
                       param="model", code="model_not_found")


def _require_engine(state: ServerState):
    if state.draining:
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
    if not state.engine.ready:
        if state.engine.state == "loading":
            raise ApiError(503, "the engine is still loading", headers={"Retry-After": "5"})
        raise ApiError(503, f"the engine is not running ({state.engine.state}: {state.engine.error})")
    return state.engine.llm


def _resolve_max_tokens(requested: int | None, prompt_len: int, max_seq_len: int, field_name: str) -> int:
    if prompt_len >= max_seq_len:
        raise ApiError(400, f"this model's maximum context length is {max_seq_len} tokens, but the prompt has "
                       f"{prompt_len} tokens", param="messages" if field_name != "max_tokens_prompt" else "prompt",
                       code="context_length_exceeded")
    if requested is None:
        return max_seq_len - prompt_len
    if prompt_len + requested > max_seq_len:
        raise ApiError(400, f"this model's maximum context length is {max_seq_len} tokens; you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                       f"completion). Reduce the prompt or {field_name}.", param=field_name,
                       code="context_length_exceeded")
    return requested




# -- the app ---------------------------------------------------------------------------------------

def create_app(engine: EngineManager, config: ServerConfig) -> FastAPI:
    state = ServerState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.rt = state
        load = asyncio.create_task(_start_engine(app, state))
        try:
            yield
        finally:
            load.cancel()
            with contextlib.suppress(BaseException):
                await load
            await engine.stop()

    app = FastAPI(title="rtllm", version=rtllm.__version__, lifespan=lifespan, root_path=config.root_path,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rt = state
    app.add_middleware(_AccessMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        request.state.log = {**(getattr(request.state, "log", None) or {}), "error": e.message}
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": engine.state, "error": None if engine.error is None else str(engine.error)},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": rtllm.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(state, request)
        llm = engine.llm
        info = llm.executor.engine_info if (llm is not None and engine.state == "ready") else {}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "rtllm",
             "root": info.get("model"), "max_model_len": info.get("max_seq_len")}
            for name in config.served_model_names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_auth(state, request)
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_json(state, request))
        _check_model(state, req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        llm = _require_engine(state)
        tok = llm.tokenizer
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                           **(req.chat_template_kwargs or {}))
            ids = tok.encode(text, add_special_tokens=False)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param="messages") from None
        field_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = _resolve_max_tokens(req.max_completion_tokens or req.max_tokens, len(ids),
                                         llm.executor.engine_info["max_seq_len"], field_name)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, k)
        rid = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ResponseFormatter(state.model_name, True, rid, tok, k)
        return await generate(state, request, req, fmt, [(ids, text)], params)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _check_auth(state, request)
        req: CompletionRequest = _parse(CompletionRequest, await _read_json(state, request))
        _check_model(state, req.model)
        llm = _require_engine(state)
        tok = llm.tokenizer
        p = req.prompt
        if isinstance(p, str):
            prompts_in: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts_in = [p]
        else:
            prompts_in = list(p)
        if not prompts_in or any(len(x) == 0 for x in prompts_in):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        prompts = [(tok.encode(x), x) if isinstance(x, str) else (list(x), None) for x in prompts_in]
        max_seq_len = llm.executor.engine_info["max_seq_len"]
        max_tokens = None
        for ids, _ in prompts:
            max_tokens = _resolve_max_tokens(req.max_tokens, len(ids), max_seq_len, "max_tokens")
        if req.max_tokens is None and len(prompts) > 1:
            max_tokens = min(max_seq_len - len(ids) for ids, _ in prompts)
        params = sampling_params(req, max_tokens, req.logprobs)
        echo = None
        if req.echo:
            echo = [text if text is not None else tok.decode(ids) for ids, text in prompts for _ in range(req.n)]
        rid = request.headers.get("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        fmt = ResponseFormatter(state.model_name, False, rid, tok, req.logprobs, echo)
        return await generate(state, request, req, fmt, prompts, params)

    return app


async def _start_engine(app: FastAPI, state: ServerState) -> None:
    try:
        await state.engine.start()
    except BaseException:
        stop = getattr(app.state, "request_exit", None)
        if stop is not None:
            stop(1)
        return
    stop = getattr(app.state, "request_exit", None)
    state.engine.watch(stop if stop is not None else (lambda code: None))


class _AccessMiddleware:
    """Pure ASGI: counts responses by route and status, logs one JSON line per request."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            route = path if path in _ROUTES else "other"
            self.state.metrics.http.labels(route, str(status["code"])).inc()
            if route.startswith("/v1/") or status["code"] >= 400:
                st = scope.get("state") or {}
                extra = dict(st.get("log") or {})
                extra.update(method=scope.get("method"), path=path, status=status["code"],
                             latency_ms=round((time.perf_counter() - t0) * 1000, 2))
                access_log.info("request", extra={"fields": extra})
