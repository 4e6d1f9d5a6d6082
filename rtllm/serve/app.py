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
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import rtllm
from rtllm.errors import EngineDeadError, InvalidRequestError
from rtllm.executor.result import GenerationResult, RequestOutput
from rtllm.sampling_params import SamplingParams
from rtllm.serve.engine import EngineManager
from rtllm.serve.metrics import CONTENT_TYPE, ServerMetrics
from rtllm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ValidationError,
    describe_validation_error,
    unsupported_fields,
)

logger = logging.getLogger("rtllm.serve")
access_log = logging.getLogger("rtllm.serve.access")

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics")


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_queue: int = 1024  # sequences allowed to wait beyond the engine's max_batch_size
    max_body_bytes: int = 4 * 2**20
    log_prompts: bool = False  # put prompt and completion text in the access log
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    root_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """What the routes share: the engine, metrics, the in-flight table and the drain flag."""

    def __init__(self, engine: EngineManager, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_names[0]
        self.metrics = ServerMetrics(self.model_name, self._engine_snapshot)
        self.inflight: dict[str, list[GenerationResult]] = {}
        self.inflight_seqs = 0
        self.draining = False
        self.created = int(time.time())

    def _engine_snapshot(self) -> dict | None:
        llm = self.engine.llm
        if llm is None or self.engine.state != "ready":
            return None
        ex = llm.executor
        s = ex.stats()
        running, waiting = ex.num_requests()
        return {"num_running": running, "num_waiting": waiting, "kv_used_blocks": s.used_blocks,
                "kv_total_blocks": s.num_blocks, "prefix_queries": s.queried_tokens, "prefix_hits": s.hit_tokens}

    def max_inflight(self) -> int:
        return self.engine.llm.args.max_batch_size + self.config.max_queue

    def abort_all(self, reason: str) -> int:
        n = 0
        for results in list(self.inflight.values()):
            for r in results:
                if not r.finished:
                    r.abort_reason = reason
                    r.abort()
                    n += 1
        return n


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


def _sampling_params(req, max_tokens: int, logprobs: int | None) -> SamplingParams:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_k=top_k, top_p=1.0 if req.top_p is None else float(req.top_p),
        min_p=0.0 if req.min_p is None else float(req.min_p), seed=req.seed, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        presence_penalty=float(req.presence_penalty or 0.0), frequency_penalty=float(req.frequency_penalty or 0.0),
        n=req.n, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output)


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


# -- response formatting -------------------------------------------------------------------------

class _Formatter:
    """Builds one endpoint's JSON objects; ``chat`` selects chat.completion vs text_completion."""

    def __init__(self, state: ServerState, chat: bool, request_id: str, tokenizer, top_logprobs: int | None,
                 echo_texts: list[str] | None = None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = state.model_name
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.k = top_logprobs
        self.echo_texts = echo_texts
        self._token_str = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, text_offset0: int = 0):
        if self.k is None or entries is None:
            return None
        if self.chat:
            content = []
            for tid, entry in zip(token_ids, entries):
                s = self._token_str(tid)
                top = sorted(entry.items(), key=lambda kv: -kv[1])[: self.k]
                content.append({"token": s, "logprob": entry.get(tid, float("-inf")), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": (t := self._token_str(i)), "logprob": lp,
                                                  "bytes": list(t.encode())} for i, lp in top]})
            return {"content": content, "refusal": None}
        tokens, lps, tops, offsets, off = [], [], [], [], text_offset0
        for tid, entry in zip(token_ids, entries):
            s = self._token_str(tid)
            tokens.append(s)
            lps.append(entry.get(tid, float("-inf")))
            tops.append({self._token_str(i): lp for i, lp in sorted(entry.items(), key=lambda kv: -kv[1])[: self.k]})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, text: str, token_ids: list[int], entries, finish_reason: str | None) -> dict:
        lp = self.logprobs(token_ids, entries)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": lp, "finish_reason": finish_reason}
        if self.echo_texts is not None:
            text = self.echo_texts[index] + text
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage,
                "system_fingerprint": None}

    def chunk(self, index: int, text: str | None, token_ids: list[int], entries, finish_reason: str | None,
              role: bool = False, usage: Any = ...) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c = {"index": index, "delta": delta, "logprobs": self.logprobs(token_ids, entries),
                 "finish_reason": finish_reason}
        else:
            c = {"index": index, "text": text or "", "logprobs": self.logprobs(token_ids, entries),
                 "finish_reason": finish_reason}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [c]}
        if usage is not ...:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage}


def _usage(results: list[GenerationResult], prompt_lens: list[int], outputs: list[RequestOutput | None]) -> dict:
    completion = sum(len(o.token_ids) for out in outputs if out is not None for o in out.outputs)
    prompt = sum(prompt_lens)
    cached = sum(r.metrics.num_cached_prompt_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


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
        params = _build_params(req, max_tokens, k)
        rid = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        fmt = _Formatter(state, True, rid, tok, k)
        return await _generate(state, request, req, fmt, [(ids, text)], params)

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
        params = _build_params(req, max_tokens, req.logprobs)
        echo = None
        if req.echo:
            echo = [text if text is not None else tok.decode(ids) for ids, text in prompts for _ in range(req.n)]
        rid = request.headers.get("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        fmt = _Formatter(state, False, rid, tok, req.logprobs, echo)
        return await _generate(state, request, req, fmt, prompts, params)

    return app


def _build_params(req, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return _sampling_params(req, max_tokens, logprobs)
    except InvalidRequestError as e:
        msg = str(e)
        param = msg.split("=", 1)[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
        raise ApiError(400, msg, param=param) from None


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


async def _generate(state: ServerState, request: Request, req, fmt: _Formatter,
                    prompts: list[tuple[list[int], str | None]], params: SamplingParams):
    """Admit, submit one engine request per prompt, then stream or collect."""
    llm = state.engine.llm
    seqs = len(prompts) * params.n
    if state.inflight_seqs + seqs > state.max_inflight():
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(429, f"the server is at capacity ({state.inflight_seqs} sequences in flight, limit "
                       f"{state.max_inflight()}); retry later", headers={"Retry-After": "1"})
    results: list[GenerationResult] = []
    try:
        for ids, _ in prompts:
            results.append(llm.generate_async(ids, params, streaming=req.stream))
    except InvalidRequestError as e:
        for r in results:
            r.abort()
        raise ApiError(400, str(e)) from None
    except EngineDeadError as e:
        for r in results:
            r.abort()
        raise ApiError(503, f"the engine is not running: {e}") from None
    state.inflight[fmt.id] = results
    state.inflight_seqs += seqs
    request.state.log = {"request_id": fmt.id, "prompt_tokens": sum(len(ids) for ids, _ in prompts),
                         "n": params.n, "stream": req.stream, "user": req.user}
    if state.config.log_prompts:
        request.state.log["prompt"] = [text for _, text in prompts]
    done = _Done(state, fmt.id, seqs, results, [len(ids) for ids, _ in prompts], request)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, fmt, results, params.n, include_usage, done),
                                 media_type="text/event-stream",
                                 headers={"X-Request-Id": fmt.id, "Cache-Control": "no-cache"})
    try:
        outputs = await _collect(request, results)
    except BaseException:
        done.finish([], aborted=True)
        raise
    done.finish(outputs)
    reasons = [o.finish_reason for out in outputs for o in out.outputs]
    if "abort" in reasons:
        why = getattr(results[0], "abort_reason", None) or "the request was aborted"
        raise ApiError(503, why)
    choices = [fmt.choice(pi * params.n + o.index, o.text, o.token_ids, o.logprobs, o.finish_reason)
               for pi, out in enumerate(outputs) for o in out.outputs]
    return JSONResponse(fmt.response(choices, _usage(results, done.prompt_lens, outputs)),
                        headers={"X-Request-Id": fmt.id})


class _Done:
    """Runs once when a request ends: frees its admission slots, records metrics, fills the log."""

    def __init__(self, state, rid, seqs, results, prompt_lens, request) -> None:
        self.state, self.rid, self.seqs, self.results = state, rid, seqs, results
        self.prompt_lens, self.request = prompt_lens, request
        self.done = False

    def finish(self, outputs: list[RequestOutput | None], aborted: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self.state.inflight.pop(self.rid, None)
        self.state.inflight_seqs -= self.seqs
        for r in self.results:
            if not r.finished:
                r.abort()
        reasons, generated = [], 0
        for r, out in zip(self.results, outputs + [None] * (len(self.results) - len(outputs))):
            seqs = out.outputs if out is not None else [s.out for s in r._seqs]
            for o in seqs:
                reasons.append("abort" if aborted or o.finish_reason is None else o.finish_reason)
                generated += len(o.token_ids)
        m = self.results[0].metrics if self.results else None
        self.state.metrics.record_request(
            sum(self.prompt_lens), generated, reasons, m and m.time_to_first_token, m and m.time_per_output_token,
            time.monotonic() - m.arrival_time if m else None, m and m.queue_time)
        log = getattr(self.request.state, "log", None)
        if log is not None:
            log.update(completion_tokens=generated, finish_reasons=sorted(set(reasons)),
                       ttft_ms=None if m is None or m.time_to_first_token is None
                       else round(m.time_to_first_token * 1000, 2))
            if self.state.config.log_prompts:
                log["completion"] = [o.text for out in outputs if out is not None for o in out.outputs]


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _collect(request: Request, results: list[GenerationResult]) -> list[RequestOutput]:
    """Wait for every result; a client disconnect aborts them all (CancelledError propagates)."""
    gather = asyncio.ensure_future(asyncio.gather(*(r.aresult() for r in results)))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({gather, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not gather.done():
        gather.cancel()
        for r in results:
            r.abort()
        raise asyncio.CancelledError("the client disconnected")
    try:
        return gather.result()
    except EngineDeadError as e:
        raise ApiError(500, f"the engine failed while generating: {e}") from None
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None


async def _merged(results: list[GenerationResult]):
    """(prompt index, snapshot) from every result's stream, as they arrive."""
    if len(results) == 1:
        async for snap in results[0]:
            yield 0, snap
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, r: GenerationResult) -> None:
        try:
            async for snap in r:
                await queue.put((i, snap, None))
        except BaseException as e:
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(results)]
    try:
        live = len(tasks)
        while live:
            i, snap, err = await queue.get()
            if err is not None:
                raise err
            if snap is None:
                live -= 1
                continue
            yield i, snap
    finally:
        for t in tasks:
            t.cancel()


async def _stream(state: ServerState, fmt: _Formatter, results: list[GenerationResult], n: int, include_usage: bool,
                  done: _Done):
    usage_field = None if include_usage else ...
    finals: list[RequestOutput | None] = [None] * len(results)
    try:
        if fmt.chat:
            for pi in range(len(results)):
                for i in range(n):
                    yield _sse(fmt.chunk(pi * n + i, "", [], None, None, role=True, usage=usage_field))
        elif fmt.echo_texts is not None:
            for idx, text in enumerate(fmt.echo_texts):
                yield _sse(fmt.chunk(idx, text, [], None, None, usage=usage_field))
        sent_finish: set[int] = set()
        try:
            async for pi, snap in _merged(results):
                if snap.finished:
                    finals[pi] = snap
                for o in snap.outputs:
                    idx = pi * n + o.index
                    if o.finish_reason == "abort":
                        continue
                    if o.text_diff or (o.token_ids_diff and fmt.k is not None):
                        new_lp = None if o.logprobs is None else o.logprobs[len(o.token_ids) - len(o.token_ids_diff):]
                        yield _sse(fmt.chunk(idx, o.text_diff, o.token_ids_diff, new_lp, None, usage=usage_field))
                    if o.finished and idx not in sent_finish:
                        sent_finish.add(idx)
                        yield _sse(fmt.chunk(idx, None if fmt.chat else "", [], None, o.finish_reason,
                                             usage=usage_field))
        except (EngineDeadError, InvalidRequestError) as e:
            done.finish([f for f in finals], aborted=True)
            yield _sse(ApiError(500, f"the engine failed while generating: {e}").body())
            yield b"data: [DONE]\n\n"
            return
        if any(o.finish_reason == "abort" for f in finals if f is not None for o in f.outputs):
            why = getattr(results[0], "abort_reason", None) or "the request was aborted"
            done.finish(finals, aborted=True)
            yield _sse(ApiError(503, why).body())
            yield b"data: [DONE]\n\n"
            return
        done.finish(finals)
        if include_usage:
            yield _sse(fmt.usage_chunk(_usage(results, done.prompt_lens, finals)))
        yield b"data: [DONE]\n\n"
    finally:
        if not done.done:  # the client went away (the response task was cancelled)
            done.finish(finals, aborted=True)


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
