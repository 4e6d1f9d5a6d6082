"""Outputs and the GenerationResult future/stream returned by ``submit``.

A GenerationResult accumulates the engine's token updates for one client request (n sequences),
detokenizes them incrementally, applies stop strings, and wakes sync and async waiters.
Streaming consumers receive snapshots; ``text_diff`` / ``token_ids_diff`` hold what is new since
that consumer's previous snapshot, so the diffs always concatenate to the final text.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

from rtllm.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from rtllm.executor.request import GenerationRequest
from rtllm.runtime.scheduler import RequestUpdate
from rtllm.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token id: logprob} top-k + sampled
    cumulative_logprob: float | None = None
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    first_scheduled_time: float | None = None  # when the engine first scheduled it (same clock)
    # when each generated token reached this process (same clock; all sequences of an n > 1 request)
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        """Seconds between submission and the engine first scheduling the request."""
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    metrics: RequestMetrics | None = None


class _Sequence:
    """Per-sample state: the detokenizer and the CompletionOutput being built."""

    def __init__(self, index: int, detok: IncrementalDetokenizer, want_logprobs: bool) -> None:
        self.out = CompletionOutput(index, logprobs=[] if want_logprobs else None,
                                    cumulative_logprob=0.0 if want_logprobs else None)
        self.detok = detok


AsyncWaiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]


def _set_all(events: list[asyncio.Event]) -> None:
    for ev in events:
        ev.set()


def wake_all(waiters: list[AsyncWaiter]) -> None:
    """Set each waiter's event from any thread: one ``call_soon_threadsafe`` per event loop (each
    call writes to the loop's self-pipe; one per request and token cost the server's event loop
    a syscall and a wake-up per streamed token)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, ev in waiters:
        by_loop.setdefault(loop, []).append(ev)
    for loop, events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop was closed: its waiters are gone
            loop.call_soon_threadsafe(_set_all, events)


class GenerationResult:
    def __init__(self, request: GenerationRequest, make_detok: Callable[[], IncrementalDetokenizer],
                 abort_fn: Callable[[int], None]) -> None:
        p = request.sampling_params
        self.request = request
        self.request_id = request.request_id
        self._seqs = [_Sequence(i, make_detok(), p.logprobs is not None) for i in range(p.n)]
        self._abort_fn = abort_fn
        self._cond = threading.Condition()
        self._async_waiters: list[AsyncWaiter] = []  # streaming consumers: woken on every update
        self._final_waiters: list[AsyncWaiter] = []  # aresult(): woken once, when the request ends
        self._version = 0
        self._error: BaseException | None = None
        self.prompt_logprobs: list | None = [] if p.prompt_logprobs is not None else None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.finished = False

    # -- fed by the executor (engine thread) ------------------------------------------------
    def apply(self, index: int, u: RequestUpdate, wake: list[AsyncWaiter] | None = None) -> bool:
        """Apply one engine update to sequence ``index``. Returns True when a stop string ended it
        (the executor then aborts the engine-side request).

        ``wake``: collect the asyncio waiters to wake instead of waking each one now, so that the
        executor wakes an event loop once per engine step, not once per request (``wake_all``)."""
        seq = self._seqs[index]
        if seq.out.finished:
            return False
        stopped_by_string = False
        now = time.monotonic()
        if u.prompt_logprobs is not None and index == 0 and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(u.prompt_logprobs)
        for tok in u.new_token_ids:
            if self.metrics.first_token_time is None:
                self.metrics.first_token_time = now
                self.metrics.num_cached_prompt_tokens = u.num_cached_tokens
            if u.scheduled_time is not None and self.metrics.first_scheduled_time is None:
                self.metrics.first_scheduled_time = u.scheduled_time
            seq.out.token_ids.append(tok)
            self.metrics.num_generated_tokens += 1
            self.metrics.token_times.append(now)
            if seq.out.logprobs is not None and u.logprob is not None:
                entry = dict(u.top_logprobs or [])
                entry[tok] = u.logprob
                seq.out.logprobs.append(entry)
                seq.out.cumulative_logprob += u.logprob
            seq.detok.append(tok)
            if seq.detok.stop_reason is not None:
                seq.out.finish_reason, seq.out.stop_reason = "stop", seq.detok.stop_reason
                stopped_by_string = True
                break
        if not stopped_by_string and u.finished:
            seq.out.finish_reason = u.finish_reason
            seq.out.stop_reason = u.stop_reason
        # Streamed text never shows a tail that a stop string could still trim.
        seq.out.text += seq.detok.finish() if seq.out.finished else seq.detok.pop_delta()
        self._notify(now, wake)
        return stopped_by_string

    def fail(self, error: BaseException) -> None:
        self._error = error
        for seq in self._seqs:
            if not seq.out.finished:
                seq.out.finish_reason = "abort"
        self._notify(time.monotonic())

    def _notify(self, now: float, wake: list[AsyncWaiter] | None = None) -> None:
        with self._cond:
            self._version += 1
            if all(s.out.finished for s in self._seqs):
                self.finished = True
                self.metrics.finished_time = now
            self._cond.notify_all()
            waiters = self._async_waiters + self._final_waiters if self.finished else list(self._async_waiters)
        if wake is None:
            wake_all(waiters)
        else:
            wake.extend(waiters)

    # -- client side ------------------------------------------------------------------------
    def abort(self) -> None:
        self._abort_fn(self.request_id)

    def _snapshot(self, seen: list[tuple[int, int]]) -> RequestOutput:
        outs = []
        for i, seq in enumerate(self._seqs):
            o = seq.out
            t0, k0 = seen[i]
            outs.append(replace(o, token_ids=list(o.token_ids), text_diff=o.text[t0:],
                                token_ids_diff=o.token_ids[k0:],
                                logprobs=None if o.logprobs is None else list(o.logprobs)))
            seen[i] = (len(o.text), len(o.token_ids))
        return RequestOutput(self.request_id, self.request.prompt, self.request.prompt_token_ids, outs,
                             self.finished, self.prompt_logprobs, self.metrics)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, InvalidRequestError | EngineDeadError | RequestFailedError):
                raise self._error
            raise EngineDeadError(str(self._error)) from self._error

    def result(self, timeout: float | None = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        self._raise_if_failed()
        return self._snapshot([(0, 0)] * len(self._seqs))

    def __iter__(self) -> Iterator[RequestOutput]:
        seen = [(0, 0)] * len(self._seqs)
        version = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda v=version: self._version > v or self.finished)
                version = self._version
                snap = self._snapshot(seen)
            self._raise_if_failed()
            if any(o.text_diff or o.token_ids_diff for o in snap.outputs) or snap.finished:
                yield snap
            if snap.finished:
                return

    async def aresult(self) -> RequestOutput:
        async for _ in self._aiter(yield_all=False):
            pass
        self._raise_if_failed()
        return self._snapshot([(0, 0)] * len(self._seqs))

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._aiter(yield_all=True)

    async def _aiter(self, yield_all: bool) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        waiters = self._async_waiters if yield_all else self._final_waiters
        with self._cond:
            waiters.append((loop, ev))
        seen = [(0, 0)] * len(self._seqs)
        version = -1
        try:
            while True:
                with self._cond:
                    changed = self._version != version
                    version = self._version
                    snap = self._snapshot(seen) if (changed and yield_all) else None
                    done = self.finished
                if snap is not None:
                    self._raise_if_failed()
                    if any(o.text_diff or o.token_ids_diff for o in snap.outputs) or done:
                        yield snap
                if done:
                    return
                await ev.wait()
                ev.clear()
        finally:
            with self._cond:
                waiters.remove((loop, ev))
