"""Messages between the multi-process executor (parent) and its engine worker process.

Every message is a small dataclass, pickled (protocol 5) into one ZeroMQ frame. The sockets are
ipc:// endpoints inside a private (0700) temp directory, so only this user's processes can
reach them; pickle is safe under that assumption and nowhere else.

parent -> worker: NewRequest (defined by the runtime), Abort, Shutdown
worker -> parent: Ready once after the engine is built, then one UpdateBatch per step that
                  produced updates; Fatal when start-up or a step fails (the worker then exits)
ranks 1..N-1 of a model split across ranks -> parent: Fatal only (they take no requests)
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from rtllm.config import EngineConfig
from rtllm.runtime.kv_cache_manager import KVCacheStats
from rtllm.runtime.py_executor import NewRequest
from rtllm.runtime.scheduler import RequestUpdate

__all__ = ["NewRequest", "Abort", "Shutdown", "Ready", "UpdateBatch", "Fatal", "WorkerConfig", "PeerGone", "send",
           "recv_all", "dumps", "loads"]


@dataclass
class WorkerConfig:
    """What the worker process is started with (pickled by multiprocessing's spawn)."""

    engine_config: EngineConfig
    input_addr: str | None  # the worker PULLs NewRequest / Abort / Shutdown from here
    output_addr: str | None  # the worker PUSHes Ready / UpdateBatch / Fatal here (None: a launched follower)
    eos_token_ids: frozenset[int] | None = None  # the tokenizer's end tokens, applied with set_eos_token_ids
    ipc_dir: str | None = None  # the sockets' directory: the worker removes it if the parent dies first
    log_level: int | None = None  # the parent's effective root log level (spawn does not carry logging setup)
    # the model split across ranks (engine_config.mapping.world_size > 1): this process's rank and the
    # torch.distributed rendezvous (tcp://host:port). Rank 0 runs the step loop; the others follow it
    rank: int = 0
    dist_init_method: str | None = None
    local_rank: int | None = None  # ranks started by a launcher (rtllm.executor.launcher): the GPU index on its node


@dataclass
class Abort:
    request_id: str  # an engine sequence id


@dataclass
class Shutdown:
    pass


@dataclass
class Ready:
    info: dict[str, Any]  # PyExecutor.info(): limits for validation, eos ids, device, dtype, ...


@dataclass
class UpdateBatch:
    updates: list[RequestUpdate]
    stats: KVCacheStats  # the KV cache after this step (blocks of finished requests already freed)
    num_running: int = 0  # sequences in the scheduler's running batch / waiting queue after this step
    num_waiting: int = 0
    peak_memory: int = 0  # the engine's peak device memory so far, bytes (0 on CPU)


@dataclass
class Fatal:
    """The worker failed. ``error_type`` is the exception's class name; the parent re-raises an
    rtllm.errors class of that name with the same message (else EngineDeadError)."""

    error_type: str
    message: str
    traceback: str = ""
    during_startup: bool = False
    rank: int = 0  # the rank that failed (the model split across ranks)
    # when it failed (time.time()): of several ranks' reports, the earliest is the cause, the others
    # their failed collectives (a rank's peers fail only once it has stopped, after it made its report)
    failed_at: float = field(default_factory=time.time)


def dumps(msg: object) -> bytes:
    return pickle.dumps(msg, protocol=5)


def loads(data: bytes) -> object:
    return pickle.loads(data)


class PeerGone(Exception):
    """The process at the other end of a socket is gone (or unreachable for the whole timeout)."""


def send(sock: zmq.Socket, msg: object, peer_alive: Callable[[], bool], timeout: float = 10.0) -> None:
    """Send one message on a PUSH socket without ever blocking on a dead peer.

    High-water marks are off on both ends, so a send can only be refused while no peer is
    connected: before the first (asynchronous) connect completes, or after the peer died. Wait
    for a connection while ``peer_alive()``, up to ``timeout`` seconds; raise PeerGone otherwise.
    """
    data = dumps(msg)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.send(data, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if not peer_alive() or time.monotonic() > deadline:
            raise PeerGone
        sock.poll(20, zmq.POLLOUT)


def recv_all(sock: zmq.Socket) -> list[object]:
    """Every message already queued on ``sock``, without waiting."""
    msgs = []
    while True:
        try:
            msgs.append(loads(sock.recv(zmq.NOBLOCK)))
        except zmq.Again:
            return msgs
