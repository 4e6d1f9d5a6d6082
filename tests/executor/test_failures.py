"""Which rank a multi-rank failure is named after (executor/failures.py's rule, MultiProcessExecutor._blame),
on the reports alone: two rank processes that exited with an error, their Fatal reports in one batch."""

from __future__ import annotations

import multiprocessing
import sys
import threading

import zmq

from rtllm.executor.messages import Fatal
from rtllm.executor.multiprocess import MultiProcessExecutor


def _exit_with_error() -> None:
    sys.exit(1)


def test_the_earliest_report_is_named_whatever_order_the_socket_gives(tmp_path):
    """A PULL socket takes the ranks' connections in turns, so a batch can hold rank 0's reaction (its
    failed receive) before rank 1's own, earlier error: rank 1 is named either way."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_exit_with_error) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [1, 1]
    zctx = zmq.Context()
    out = zctx.socket(zmq.PULL)
    out.bind(f"ipc://{tmp_path}/out")
    ex = object.__new__(MultiProcessExecutor)  # only what _handle reads: no engine behind it
    ex._procs, ex._world_size, ex._out = procs, 2, out
    ex._lock, ex._results = threading.Lock(), {}
    own = Fatal("RuntimeError", "injected failure on rank 1", "tb", rank=1, failed_at=100.0)
    reaction = Fatal("RuntimeError", "Connection reset by peer", "tb", rank=0, failed_at=101.0)
    try:
        for batch in ([reaction, own], [own, reaction]):
            ex._dead = None
            ex._handle(batch)
            assert "rank 1 of 2" in str(ex._dead) and "injected failure on rank 1" in str(ex._dead)
    finally:
        out.close(linger=0)
        zctx.term()
