"""The engine worker process: runs PyExecutor's step loop in its main thread.

Started by MultiProcessExecutor with the ``spawn`` context (a fresh interpreter: no inherited
CUDA or OpenMP state). Life cycle:

1. connect both sockets (the parent has bound them), build the PyExecutor;
   on failure send Fatal(during_startup=True) and exit with code 1;
2. send Ready(engine.info());
3. run the step loop: each iteration moves every queued message into the engine (waiting up to
   0.1 s only when idle), steps, and sends one UpdateBatch with the KV stats after the step;
4. exit 0 on Shutdown or when the parent process is gone; on a failed step the loop has already
   sent the error updates: send Fatal and exit 1.

The worker ignores SIGINT: Ctrl-C reaches the whole process group, and the parent decides.

A model split across ranks (tensor / pipeline parallel) runs one such process per rank, all joined
in one torch.distributed group: rank 0 is the worker above (its PyExecutor broadcasts every step),
ranks 1..N-1 build their slice of the engine and follow rank 0's steps (``PyExecutor.follow_loop``)
until rank 0 stops them at shutdown; they only send Fatal (with their rank) when they fail, and
exit when the parent process is gone. Under an external launcher (torchrun: rtllm.executor.launcher)
only rank 0 is spawned here; the other ranks are the launch's own processes, which call
``follow_rank`` from ``LLM()`` with no parent executor to report to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import traceback

import torch
import zmq

from rtllm.config import EngineConfig
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
from rtllm.parallel import comm
from rtllm.runtime.gc_monitor import GcMonitor
from rtllm.runtime.py_executor import PyExecutor
from rtllm.runtime.scheduler import RequestUpdate

logger = logging.getLogger(__name__)


class _Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.ctx = zmq.Context()
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.RCVHWM, 0)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.connect(cfg.input_addr)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.SNDHWM, 0)
        self.out.setsockopt(zmq.LINGER, 5000)  # close() waits for queued messages (Fatal) to leave
        self.out.connect(cfg.output_addr)
        parent = multiprocessing.parent_process()
        self.parent_sentinel = parent.sentinel if parent is not None else None
        self.poller = zmq.Poller()
        self.poller.register(self.inp, zmq.POLLIN)
        if self.parent_sentinel is not None:
            self.poller.register(self.parent_sentinel, zmq.POLLIN)
        self.stop = threading.Event()
        self.engine: PyExecutor | None = None
        self.parent_gone = False
        self.ipc_dir = cfg.ipc_dir

    def parent_alive(self) -> bool:
        if self.parent_sentinel is None:
            return True
        return not multiprocessing.connection.wait([self.parent_sentinel], timeout=0)

    def send(self, msg: object) -> None:
        try:
            send(self.out, msg, self.parent_alive)
        except PeerGone:
            self.parent_gone = True
            self.stop.set()
            raise

    def intake(self, timeout: float) -> None:
        """Move queued messages into the engine; wait up to ``timeout`` s when there are none."""
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self.parent_sentinel is not None and self.parent_sentinel in events:
            self.parent_gone = True  # nobody will read our updates
            self.stop.set()
            return
        if self.inp not in events:
            return
        for msg in recv_all(self.inp):
            if isinstance(msg, NewRequest):
                self.engine.enqueue(msg)
            elif isinstance(msg, Abort):
                self.engine.abort(msg.request_id)
            elif isinstance(msg, Shutdown):
                self.stop.set()

    def emit(self, updates: list[RequestUpdate]) -> None:
        s = self.engine.scheduler
        self.send(UpdateBatch(updates, self.engine.kv.stats(), len(s.running), len(s.waiting),
                              self.engine.peak_memory_bytes()))

    def run(self, cfg: WorkerConfig) -> int:
        try:
            self.engine = PyExecutor(join_group(cfg))
            if cfg.eos_token_ids is not None:
                self.engine.set_eos_token_ids(cfg.eos_token_ids)
        except BaseException as e:
            return self._fatal(e, during_startup=True)
        # start-up objects (model, caches, captured graphs) live as long as the process: keep them out
        # of every later collection, so a full collection walks only what serving allocates
        gc.collect()
        gc.freeze()
        monitor = GcMonitor().install()
        try:
            self.send(Ready(self.engine.info()))
            self.engine.run_loop(self.emit, self.stop, self.intake)
            self.engine.stop_followers()
        except PeerGone:
            return 0
        except BaseException as e:
            return self._fatal(e, during_startup=False)
        finally:
            monitor.uninstall()
            log = logger.warning if monitor.max_s >= 0.05 else logger.info
            log("engine worker %s", monitor.summary())
        return 0

    def _fatal(self, e: BaseException, during_startup: bool) -> int:
        msg = Fatal(type(e).__name__, str(e), traceback.format_exc(), during_startup, rank=0)
        with contextlib.suppress(PeerGone):
            self.send(msg)
        return 1

    def close(self) -> None:
        self.inp.close(linger=0)
        self.out.close(linger=0 if self.parent_gone else None)
        self.ctx.term()
        if self.parent_gone and self.ipc_dir:  # the parent could not clean up after itself
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def join_group(cfg: WorkerConfig) -> EngineConfig:
    """The engine config of this process. A model split across ranks: join the torch.distributed group
    first; the config then carries this rank's Mapping (and its GPU, one per rank on one host)."""
    ec = cfg.engine_config
    mapping = ec.mapping
    if mapping is None or mapping.world_size == 1:
        return ec
    mapping = mapping.with_rank(cfg.rank)
    device = ec.device
    if device.startswith("cuda"):
        local = cfg.local_rank if cfg.local_rank is not None else cfg.rank
        device = f"cuda:{local % torch.cuda.device_count()}"
    else:  # the host's cores shared between the ranks, not oversubscribed (nor above OMP_NUM_THREADS)
        torch.set_num_threads(comm.cpu_threads_per_rank(mapping.world_size))
    comm.init_distributed(mapping, cfg.dist_init_method, device)
    return dataclasses.replace(ec, mapping=mapping, device=device)


def follow_rank(cfg: WorkerConfig) -> int:
    """A rank other than 0: build this rank's engine, run the steps rank 0 broadcasts until it stops the
    group, leave the group; the exit status (0, or 1 after a failure, which is reported to the parent
    executor when there is one: cfg.output_addr)."""
    code = _follow(cfg)
    if code == 0:
        comm.destroy_distributed()
    return code


def _follow(cfg: WorkerConfig) -> int:
    ctx = zmq.Context()
    out = None
    if cfg.output_addr is not None:
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, 0)
        out.setsockopt(zmq.LINGER, 5000)
        out.connect(cfg.output_addr)
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or not multiprocessing.connection.wait([parent.sentinel], timeout=0)

    def watch_parent() -> None:  # the parent died without stopping us: nobody will stop rank 0's group
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    if parent is not None:
        threading.Thread(target=watch_parent, name="rtllm-parent-watch", daemon=True).start()
    startup = True
    try:
        engine = PyExecutor(join_group(cfg))
        startup = False
        engine.follow_loop()
        return 0
    except BaseException as e:
        logger.exception("engine rank %d failed", cfg.rank)
        if out is not None:
            with contextlib.suppress(PeerGone):
                send(out, Fatal(type(e).__name__, str(e), traceback.format_exc(), startup, rank=cfg.rank),
                     parent_alive)
        return 1
    finally:
        if out is not None:
            out.close()
        ctx.term()


def worker_main(cfg: WorkerConfig) -> None:
    """Entry point of the spawned process (must stay importable at module level)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cfg.log_level is not None:
        tag = "worker" if cfg.engine_config.mapping is None else f"rank {cfg.rank}"
        logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s %(levelname)s %(name)s [{tag}]: %(message)s")
    if cfg.rank != 0:
        sys.exit(follow_rank(cfg))
    worker = _Worker(cfg)
    code = 1
    try:
        code = worker.run(cfg)
    finally:
        worker.close()
        if code == 0:
            comm.destroy_distributed()
    sys.exit(code)
