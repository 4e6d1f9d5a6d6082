"""One admitted request's life: submit to the engine, stream SSE chunks or collect the whole answer,
abort on client disconnect, and account for it once when it ends (admission slots, metrics, log)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from rtllm.errors import EngineDeadError, InvalidRequestError
from rtllm.executor.result import GenerationResult, RequestOutput
from rtllm.sampling_params import SamplingParams
from rtllm.serve.formatting import ResponseFormatter, sse, usage
from rtllm.serve.protocol import ApiError
from rtllm.serve.state import ServerState


def sampling_params(req, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams; a value the engine rejects is a 400 naming the field."""
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    try:
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
    except InvalidRequestError as e:
        msg = str(e)
        param = msg.split("=", 1)[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
        raise ApiError(400, msg, param=param) from None


async def generate(state: ServerState, request: Request, req, fmt: ResponseFormatter,
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
    return JSONResponse(fmt.response(choices, usage(results, done.prompt_lens, outputs)),
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


async def _stream(state: ServerState, fmt: ResponseFormatter, results: list[GenerationResult], n: int,
                  include_usage: bool, done: _Done):
    usage_field = None if include_usage else ...
    finals: list[RequestOutput | None] = [None] * len(results)
    try:
        if fmt.chat:
            for pi in range(len(results)):
                for i in range(n):
                    yield sse(fmt.chunk(pi * n + i, "", [], None, None, role=True, usage=usage_field))
        elif fmt.echo_texts is not None:
            for idx, text in enumerate(fmt.echo_texts):
                yield sse(fmt.chunk(idx, text, [], None, None, usage=usage_field))
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
                        yield sse(fmt.chunk(idx, o.text_diff, o.token_ids_diff, new_lp, None, usage=usage_field))
                    if o.finished and idx not in sent_finish:
                        sent_finish.add(idx)
                        yield sse(fmt.chunk(idx, None if fmt.chat else "", [], None, o.finish_reason,
                                             usage=usage_field))
        except (EngineDeadError, InvalidRequestError) as e:
            done.finish([f for f in finals], aborted=True)
            yield sse(ApiError(500, f"the engine failed while generating: {e}").body())
            yield b"data: [DONE]\n\n"
            return
        if any(o.finish_reason == "abort" for f in finals if f is not None for o in f.outputs):
            why = getattr(results[0], "abort_reason", None) or "the request was aborted"
            done.finish(finals, aborted=True)
            yield sse(ApiError(503, why).body())
            yield b"data: [DONE]\n\n"
            return
        done.finish(finals)
        if include_usage:
            yield sse(fmt.usage_chunk(usage(results, done.prompt_lens, finals)))
        yield b"data: [DONE]\n\n"
    finally:
        if not done.done:  # the client went away (the response task was cancelled)
            done.finish(finals, aborted=True)

