"""Collectives over torch.distributed: NCCL on CUDA, gloo on the CPU, the same code for both.

One process per rank calls ``init_distributed(mapping, init_method)`` once; it creates the world
group, one tensor-parallel group per pipeline stage, one pipeline group per tp rank, (under NCCL) a
gloo group for Python objects (the step plans rank 0 sends), and one two-rank group per pipeline
link: stage s -> s+1 for each tp rank, and the last stage's tp rank 0 -> rank 0 (the logits). The
layers call ``tp_all_reduce`` / ``tp_all_gather`` only when their mapping has tp_size > 1, so a
single process never touches torch.distributed.

Pipeline traffic is point to point and non-blocking on the sending side (``isend_*`` return a
``Sent`` to wait on later), so a stage can start its next micro-batch while the previous one's
output is still on its way. Each link has its own group: under NCCL a group is a communicator with
its own stream, so the residual stream going down the pipeline and the logits coming back to rank 0
(the same pair of ranks at pp_size 2) never queue behind each other; under gloo the groups cost a
socket each. Messages on one link arrive in the order they were sent (gloo and NCCL both keep
point-to-point order per pair), which is what keeps every rank's micro-batches in rank 0's order.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rtllm.parallel.mapping import Mapping

# A rank waiting for rank 0's next step (an idle server) must not time out: peers that die close their
# sockets, which gloo reports at once, and the executor kills the group when any rank exits.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class _State:
    mapping: Mapping
    backend: str
    device: torch.device
    tp_group: object
    pp_group: object
    cpu_group: object  # gloo, for pickled objects (the world group under gloo)
    next_link: object | None = None  # this rank -> the next stage's rank of the same tp rank
    prev_link: object | None = None  # the previous stage's rank -> this rank
    logits_link: object | None = None  # the last stage's tp rank 0 -> rank 0 (on those two ranks)


_state: _State | None = None


def cpu_threads_per_rank(world_size: int) -> int:
    """Torch threads of one rank on a CPU host: its share of the cores, not oversubscribed (nor above the
    process's own OMP_NUM_THREADS / torch setting)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // world_size))


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (for a tcp:// init_method)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(mapping: Mapping, init_method: str, device: torch.device | str = "cpu",
                     timeout: datetime.timedelta = IDLE_TIMEOUT) -> None:
    """Join the process group of ``mapping.world_size`` ranks as ``mapping.rank``; build the sub-groups."""
    global _state
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, world_size=mapping.world_size, rank=mapping.rank,
                            timeout=timeout)
    tp_group = pp_group = None
    for ranks in mapping.tp_groups():  # every rank creates every group, in the same order
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < mapping.world_size else dist.group.WORLD
        if mapping.rank in ranks:
            tp_group = g
    for ranks in mapping.pp_groups():
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < mapping.world_size else dist.group.WORLD
        if mapping.rank in ranks:
            pp_group = g
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _state = _State(mapping, backend, device, tp_group, pp_group, cpu_group)
    if mapping.pp_size > 1:  # one group per pipeline link, created in the same order on every rank
        for ranks in mapping.pp_groups():
            for a, b in zip(ranks, ranks[1:]):
                g = dist.new_group([a, b], timeout=timeout)
                if mapping.rank == a:
                    _state.next_link = g
                if mapping.rank == b:
                    _state.prev_link = g
        last = (mapping.pp_size - 1) * mapping.tp_size
        g = dist.new_group([0, last], timeout=timeout)
        if mapping.rank in (0, last):
            _state.logits_link = g


def is_initialized() -> bool:
    return _state is not None


def destroy_distributed() -> None:
    global _state
    if _state is not None and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def _require() -> _State:
    if _state is None:
        raise RuntimeError("torch.distributed is not initialized in this process: a model with tp_size or "
                           "pp_size > 1 runs only under the multi-process executor (one process per rank)")
    return _state


# -- tensor parallel ---------------------------------------------------------------------------
def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group, in place; returns it."""
    st = _require()
    dist.all_reduce(x, group=st.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every tp rank's ``x`` (same shape on each) along ``dim``, in rank order."""
    st = _require()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(st.mapping.tp_size)]
    dist.all_gather(parts, x, group=st.tp_group)
    return torch.cat(parts, dim=dim)


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's ``value`` (e.g. KV blocks that fit on every rank)."""
    st = _require()
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=st.cpu_group)
    return int(t.item())


# -- the step broadcast ---------------------------------------------------------------------------
def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (others pass anything, e.g. None).

    One size broadcast and one byte broadcast over the gloo group (torch's broadcast_object_list
    moves the bytes through the device under NCCL; this keeps them on the host)."""
    st = _require()
    if st.mapping.rank == src:
        data = pickle.dumps(obj, protocol=5)
        size = torch.tensor([len(data)], dtype=torch.int64)
    else:
        size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, src=src, group=st.cpu_group)
    if st.mapping.rank == src:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=st.cpu_group)
    return obj if st.mapping.rank == src else pickle.loads(buf.numpy().tobytes())


def broadcast_tensor(x: torch.Tensor, src: int = 0, group: str = "world") -> torch.Tensor:
    """Rank ``src``'s ``x`` into ``x`` on every rank of ``group`` ("world", or "tp": this rank's
    pipeline stage, which must hold ``src``), on the device group (same shape and dtype everywhere)."""
    st = _require()
    dist.broadcast(x, src=src, group=st.tp_group if group == "tp" else None)
    return x


# -- point to point, non-blocking sends ---------------------------------------------------------------
_TAG_SIZE, _TAG_BYTES = 11, 12  # a pickled object: its size, then its bytes (on the gloo object group)


class Sent:
    """Sends in progress: ``wait()`` returns once every one has left (their buffers are kept alive until
    then). Waiting on a send whose receiver has already received it returns at once."""

    def __init__(self) -> None:
        self._works: list[tuple[object, torch.Tensor]] = []

    def add(self, work: object, buf: torch.Tensor) -> None:
        self._works.append((work, buf))

    def extend(self, other: Sent) -> None:
        self._works.extend(other._works)

    def wait(self) -> None:
        works, self._works = self._works, []
        for work, _ in works:
            work.wait()

    def __len__(self) -> int:
        return len(self._works)


def isend_object(obj: object, dst: int, sent: Sent | None = None) -> Sent:
    """Send a picklable ``obj`` to rank ``dst`` over the gloo object group without waiting for it to
    arrive; ``recv_object(src)`` on ``dst`` receives it (objects from one rank arrive in order)."""
    st = _require()
    sent = sent if sent is not None else Sent()
    data = pickle.dumps(obj, protocol=5)
    size = torch.tensor([len(data)], dtype=torch.int64)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    sent.add(dist.isend(size, dst, group=st.cpu_group, tag=_TAG_SIZE), size)
    sent.add(dist.isend(buf, dst, group=st.cpu_group, tag=_TAG_BYTES), buf)
    return sent


def recv_object(src: int) -> object:
    """The next object rank ``src`` sent this rank with ``isend_object`` (blocks until it comes)."""
    st = _require()
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=st.cpu_group, tag=_TAG_SIZE)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(buf, src, group=st.cpu_group, tag=_TAG_BYTES)
    return pickle.loads(buf.numpy().tobytes())


def _link(name: str) -> object:
    st = _require()
    g = getattr(st, name)
    if g is None:
        raise RuntimeError(f"rank {st.mapping.rank} has no {name} (pp_size={st.mapping.pp_size})")
    return g


def isend_next_stage(x: torch.Tensor, sent: Sent | None = None) -> Sent:
    """Send this stage's output to the next stage's rank of the same tp rank, without waiting."""
    st = _require()
    sent = sent if sent is not None else Sent()
    x = x.contiguous()
    sent.add(dist.isend(x, st.mapping.next_pp_rank(), group=_link("next_link")), x)
    return sent


def recv_prev_stage(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The previous stage's output (the next one it sent this rank)."""
    st = _require()
    x = torch.empty(shape, dtype=dtype, device=st.device)
    dist.recv(x, st.mapping.prev_pp_rank(), group=_link("prev_link"))
    return x


def isend_logits(x: torch.Tensor, sent: Sent | None = None) -> Sent:
    """The last stage's tp rank 0: send logits to rank 0, without waiting."""
    sent = sent if sent is not None else Sent()
    x = x.contiguous()
    sent.add(dist.isend(x, 0, group=_link("logits_link")), x)
    return sent


def recv_logits(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank 0: the next logits the last stage sent."""
    st = _require()
    x = torch.empty(shape, dtype=dtype, device=st.device)
    dist.recv(x, (st.mapping.pp_size - 1) * st.mapping.tp_size, group=_link("logits_link"))
    return x


# -- pipeline parallel ------------------------------------------------------------------------------
def send_tensor(x: torch.Tensor, dst: int) -> None:
    _require()
    dist.send(x.contiguous(), dst=dst)


def recv_tensor(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    st = _require()
    x = torch.empty(shape, dtype=dtype, device=st.device)
    dist.recv(x, src=src)
    return x
