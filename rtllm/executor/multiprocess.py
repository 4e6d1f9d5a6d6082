"""Multi-process executor: a spawned worker process runs the PyExecutor loop in its main thread.

Transport: two ZeroMQ PUSH/PULL pairs over ipc:// sockets in a private temp dir, both bound
here (the worker connects): ``in`` carries NewRequest / Abort / Shutdown to the worker, ``out``
carries Ready, one UpdateBatch per step, and Fatal back (see messages.py).

Threads in this process: callers submit / abort (sends are serialized by ``_send_lock``, as
ZeroMQ sockets are not thread-safe); one receiver thread owns the ``out`` socket and applies
updates to their results (detokenization and stop strings run here, beside the worker's next
step), and sends an Abort when a stop string ends a sequence.

Failure paths:
- start-up: the constructor waits for Ready; a Fatal re-raises the worker's error as the same
  rtllm.errors class with the same message (ModelLoadError, ConfigError, ...); a worker that
  exits without a word, or no Ready within ``startup_timeout``, raises EngineDeadError.
- the worker dies later (crash, kill, failed step): the receiver polls the worker's process
  sentinel with the socket, so it sees the exit at once, fails every pending result with an
  EngineDeadError naming the pid and exit status, and later submits raise it too.
- shutdown(): Shutdown, join (terminate, then kill, if needed), close sockets, remove the
  ipc dir. Idempotent; also run at interpreter exit. An executor dropped without it is finalized
  when collected: its workers are killed and its sockets released.

A model split across ranks (EngineConfig.mapping, world_size > 1) runs one spawned process per rank,
joined in one torch.distributed group (a tcp:// rendezvous on a free local port). Rank 0 is the
worker described above; the other ranks take no messages and follow rank 0's steps, sending only a
Fatal when they fail. Every rank's sentinel is watched: when any rank exits or reports a failure,
pending results fail at once with an EngineDeadError naming the rank at fault (failures.py says
which), and the other ranks are terminated (they would otherwise wait in a collective for the dead one).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import tempfile
import threading
import time
import weakref

import zmq

from rtllm import errors
from rtllm.config import EngineConfig
from rtllm.errors import EngineDeadError
from rtllm.executor.base import GenerationExecutor
from rtllm.executor.failures import RemoteTraceback, bootstrap_hint, describe_exit, step_failed
from rtllm.executor.launcher import launch_for
from rtllm.executor.messages import (
    Abort,
    Fatal,
    NewRequest,
    PeerGone,
    Ready,
    Shutdown,
    UpdateBatch,
    WorkerConfig,
    recv_all,
    send,
)
from rtllm.executor.worker import worker_main
from rtllm.parallel.comm import free_port
from rtllm.runtime.kv_cache_manager import KVCacheStats

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 1800.0  # loading a large checkpoint from a cold disk can take minutes


def _make_ipc_dir() -> str:
    """A fresh 0700 directory (only this user can connect) whose socket paths fit sockaddr_un (~107 bytes)."""
    path = tempfile.mkdtemp(prefix="rtllm-")
    if len(path) > 90:  # a long TMPDIR
        shutil.rmtree(path, ignore_errors=True)
        path = tempfile.mkdtemp(prefix="rtllm-", dir="/tmp")
    return path


def _release(procs: list, ctx: zmq.Context, sockets: tuple[zmq.Socket, ...], ipc_dir: str) -> None:
    """Kill worker processes still running (none after a shutdown: it stops them first), close the
    sockets (pending messages dropped), then the context, then remove the ipc dir."""
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            proc.kill()
            proc.join(5.0)
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    shutil.rmtree(ipc_dir, ignore_errors=True)


class MultiProcessExecutor(GenerationExecutor):
    remote_engine = True  # requests are pickled to the worker

    def __init__(self, engine_config: EngineConfig, tokenizer,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        super().__init__(tokenizer)
        self._stats: KVCacheStats | None = None
        self._num_requests = (0, 0)
        self._peak_memory = 0
        self._send_lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._ipc_dir = _make_ipc_dir()
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._out = self._ctx.socket(zmq.PULL)
        self._procs: list = []
        # processes, sockets, context and ipc dir are released by shutdown(), or when this executor is
        # collected without one: the finalizer holds them, so they never sit in a garbage cycle, where
        # the context's own __del__ would run term() with the sockets still open and block forever
        self._finalizer = weakref.finalize(self, _release, self._procs, self._ctx, (self._in, self._out),
                                           self._ipc_dir)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(f"ipc://{self._ipc_dir}/in")
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(f"ipc://{self._ipc_dir}/out")
        eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else None
        mapping = engine_config.mapping
        self._world_size = mapping.world_size if mapping is not None else 1
        # ranks started by a launcher (torchrun): the other ranks are its processes; spawn rank 0 only,
        # which joins through the launch's env:// rendezvous (rtllm.executor.launcher)
        self._launch = launch_for(engine_config)
        if self._launch is not None:
            init_method, local_rank, spawned = "env://", self._launch.local_rank, 1
        else:
            init_method = f"tcp://127.0.0.1:{free_port()}" if self._world_size > 1 else None
            local_rank, spawned = None, self._world_size
        ctx = multiprocessing.get_context("spawn")
        for rank in range(spawned):
            cfg = WorkerConfig(engine_config, f"ipc://{self._ipc_dir}/in", f"ipc://{self._ipc_dir}/out", eos,
                               self._ipc_dir, logging.getLogger().getEffectiveLevel(), rank=rank,
                               dist_init_method=init_method, local_rank=local_rank)
            name = "rtllm-engine-worker" if self._world_size == 1 else f"rtllm-engine-rank{rank}"
            self._procs.append(ctx.Process(target=worker_main, args=(cfg,), name=name, daemon=True))
        self._proc = self._procs[0]  # rank 0: takes requests, runs the step loop
        ref = weakref.ref(self)
        self._atexit_hook = lambda: (ex := ref()) is not None and ex.shutdown()
        atexit.register(self._atexit_hook)
        try:
            for proc in self._procs:
                proc.start()
            ready = self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self._set_engine_info(ready.info)
        self._receiver = threading.Thread(target=self._receive_loop, name="rtllm-receiver", daemon=True)
        self._receiver.start()

    # -- worker state -----------------------------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid

    @property
    def worker_pids(self) -> list[int | None]:
        """The pid of every rank's process, rank 0 first (one entry unless the model is split)."""
        return [p.pid for p in self._procs]

    def _worker_alive(self) -> bool:
        """Thread-safe and non-reaping: the sentinel becomes readable when the process ends."""
        return not multiprocessing.connection.wait([self._proc.sentinel], timeout=0)

    def _dead_ranks(self) -> list[int]:
        """Ranks whose process has exited: those killed by a signal first (the others then fail in a
        collective and exit with an error of their own), each group lowest first."""
        ended = set(multiprocessing.connection.wait([p.sentinel for p in self._procs], timeout=0))
        dead = [r for r, p in enumerate(self._procs) if p.sentinel in ended]
        for r in dead:
            self._procs[r].join(0)  # reap, so the exit code is known
        return sorted(dead, key=lambda r: (self._procs[r].exitcode or 0) >= 0)

    def _dead_rank(self) -> int | None:
        dead = self._dead_ranks()
        return dead[0] if dead else None

    def _dead_peer(self, failed_rank: int, wait: float = 1.0) -> int | None:
        """After a rank reported a failure: another rank that has exited, if any, waiting up to ``wait`` s
        for one. A peer's death is the usual cause of a failed collective, and its process sentinel
        can fire a moment after the survivor's report arrives (seen with a SIGKILLed rank 1)."""
        others = [p.sentinel for r, p in enumerate(self._procs) if r != failed_rank and p.pid is not None]
        if others:
            multiprocessing.connection.wait(others, timeout=wait)
        return next((r for r in self._dead_ranks() if r != failed_rank), None)

    def _who(self, rank: int) -> str:
        proc = self._procs[rank]
        if self._world_size == 1:
            return f"the engine worker process (pid {proc.pid})"
        return f"the engine worker process of rank {rank} of {self._world_size} (pid {proc.pid})"

    def _death_error(self, when: str = "", rank: int = 0) -> EngineDeadError:
        proc = self._procs[rank]
        proc.join(timeout=1.0)  # reap it, so the exit code is known
        return EngineDeadError(f"{self._who(rank)} {describe_exit(proc.exitcode)}{when}")

    def _stop_group(self, join_timeout: float = 2.0) -> None:
        """Terminate every rank still running (after one died: the rest would wait on it forever),
        then kill what SIGTERM left."""
        for stop in (lambda p: p.terminate(), lambda p: p.kill()):
            live = [p for p in self._procs if p.pid is not None and p.exitcode is None]
            for p in live:
                stop(p)
            for p in live:
                p.join(join_timeout)

    @property
    def engine(self):
        raise AttributeError("the engine runs in a worker process: use executor.stats() and executor.engine_info, "
                             "or LLM(executor_type='inprocess') to reach the engine object")

    # -- start-up ---------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> Ready:
        poller = zmq.Poller()
        poller.register(self._out, zmq.POLLIN)
        sentinels = [p.sentinel for p in self._procs]
        for sentinel in sentinels:
            poller.register(sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(min(left, 1.0) * 1000)))
            if any(s in events for s in sentinels):
                msgs = self._last_words()
            else:
                msgs = recv_all(self._out) if self._out in events else []
            for msg in msgs:
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, Fatal):
                    raise self._rebuild(msg)
            if (rank := self._dead_rank()) is not None:
                raise self._death_error(" during start-up" + bootstrap_hint(self._procs[rank].exitcode), rank)
        raise EngineDeadError(f"the engine worker process (pid {self._proc.pid}) did not start within {timeout:.0f} s")

    def _last_words(self) -> list[object]:
        """Everything the (exited) worker sent: its last messages can reach this socket a moment
        after its process sentinel fires, so wait up to 0.2 s for them (only the socket: the
        sentinel stays readable)."""
        msgs = recv_all(self._out)
        while self._out.poll(50 if msgs else 200, zmq.POLLIN):
            msgs += recv_all(self._out)
        return msgs

    def _rebuild(self, f: Fatal) -> BaseException:
        """The worker's error as raised there (an rtllm.errors class), else an EngineDeadError."""
        cls = getattr(errors, f.error_type, None)
        if f.during_startup and isinstance(cls, type) and issubclass(cls, errors.RtllmError):
            exc: BaseException = cls(f.message)
        else:
            what = "failed to start" if f.during_startup else "failed"
            exc = EngineDeadError(f"{self._who(f.rank)} {what}: {f.error_type}: {f.message}")
        exc.__cause__ = RemoteTraceback(f.traceback)
        return exc

    # -- receiver thread --------------------------------------------------------------------
    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._out, zmq.POLLIN)
        sentinels = [p.sentinel for p in self._procs]
        for sentinel in sentinels:
            poller.register(sentinel, zmq.POLLIN)
        try:
            while not self._closed:
                events = dict(poller.poll(100))
                if any(s in events for s in sentinels):
                    rank = self._dead_rank()
                    if rank is not None and rank > 0 and not self._closed and (self._procs[rank].exitcode or 0) < 0:
                        self._die(self._death_error(rank=rank))  # killed: name it, not its peers' failed receives
                    self._handle(self._last_words())
                    if not self._closed:
                        self._die(self._death_error(rank=rank or 0))
                        if self._world_size > 1:
                            self._stop_group()
                    return
                if self._out in events:
                    self._handle(recv_all(self._out))
        except BaseException as e:  # a bug here must not leave callers waiting forever
            logger.exception("the executor's receiver thread failed")
            self._die(EngineDeadError(f"the executor's receiver thread failed: {type(e).__name__}: {e}"))

    def _handle(self, msgs: list[object]) -> None:
        reports = []
        for msg in msgs:
            if isinstance(msg, UpdateBatch):
                self._stats = msg.stats  # first: a caller woken by the updates sees the freed blocks
                self._num_requests = (msg.num_running, msg.num_waiting)
                self._peak_memory = msg.peak_memory
                updates = msg.updates
                if self._world_size > 1:
                    # rank 0's step failed and its Fatal follows: that (or a peer's own Fatal, or the
                    # peer's death that caused it) fails the requests, named after the rank at fault
                    updates = [u for u in updates if not step_failed(u)]
                self._on_updates(updates)
            elif isinstance(msg, Fatal):
                logger.error("engine worker of rank %d failed:\n%s", msg.rank, msg.traceback)
                reports.append(msg)
        if reports:  # all of this batch's reports at once: the socket takes the ranks' in turns, not by time
            self._die(self._blame(reports) if self._world_size > 1 else self._rebuild(reports[0]))

    def _blame(self, reports: list[Fatal]) -> BaseException:
        """The error the requests fail with after ranks' failure reports, the model split across ranks:
        a rank that stops makes its peers fail in their next collective, so the cause is a peer killed
        by a signal (which reports nothing), else the earliest report (``failed_at``), this batch's or
        one a dead peer sent just before it exited (read here)."""
        first = min(reports, key=lambda r: r.failed_at)
        rank = self._dead_peer(first.rank)
        if rank is None:
            return self._rebuild(first)
        if (self._procs[rank].exitcode or 0) < 0:
            return self._death_error(rank=rank)
        later = self._last_words()
        late_reports = [m for m in later if isinstance(m, Fatal)]
        for r in late_reports:
            logger.error("engine worker of rank %d failed:\n%s", r.rank, r.traceback)
        self._handle([m for m in later if not isinstance(m, Fatal)])
        return self._rebuild(min([*reports, *late_reports], key=lambda r: r.failed_at))

    def _die(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        self._fail_all(self._dead)

    # -- sending ----------------------------------------------------------------------------
    def _send(self, msg: object) -> None:
        with self._send_lock:
            if self._in.closed:
                raise EngineDeadError("the engine is not running: the executor was shut down")
            try:
                send(self._in, msg, self._worker_alive)
            except PeerGone:
                raise (self._dead or self._death_error()) from None

    def _send_new(self, news: list[NewRequest]) -> None:
        for new in news:
            self._send(new)

    def _send_abort(self, seq_id: str) -> None:
        with contextlib.suppress(EngineDeadError):  # a dead engine holds no blocks
            self._send(Abort(seq_id))

    def stats(self) -> KVCacheStats:
        """The KV cache stats the worker sent with its latest update batch."""
        if self._stats is None:
            n = self.engine_info["num_kv_blocks"]
            return KVCacheStats(num_blocks=n, used_blocks=0, free_blocks=n, cached_blocks=0,
                                queried_tokens=0, hit_tokens=0)
        return self._stats

    def num_requests(self) -> tuple[int, int]:
        return self._num_requests

    def peak_memory_bytes(self) -> int:
        return self._peak_memory

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker (Shutdown, then terminate, then kill), fail pending results, release
        sockets and the ipc dir. Idempotent and safe from any thread but the receiver."""
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit_hook)
        if self._proc.pid is not None:
            if self._validator is None:  # still loading (a start-up failure or Ctrl-C): it reads nothing
                timeout = 0.0
            elif self._worker_alive():
                with contextlib.suppress(PeerGone), self._send_lock:
                    send(self._in, Shutdown(), self._worker_alive, timeout=1.0)
            deadline = time.monotonic() + timeout  # rank 0 stops the other ranks, then exits
            for proc in self._procs:
                if proc.pid is not None:
                    proc.join(max(deadline - time.monotonic(), 0.0))
            self._stop_group(join_timeout=5.0)
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(5.0)
        self._fail_all(EngineDeadError("the executor was shut down"))
        with self._send_lock:
            self._finalizer()
