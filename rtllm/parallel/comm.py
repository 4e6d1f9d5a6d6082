"""Collectives over torch.distributed: NCCL on CUDA, gloo on the CPU, the same code for both.

One process per rank calls ``init_distributed(mapping, init_method)`` once; it creates the world
group, one tensor-parallel group per pipeline stage, one pipeline group per tp rank, and (under
NCCL) a gloo group for Python objects (the step plans rank 0 broadcasts). The layers call
``tp_all_reduce`` / ``tp_all_gather`` only when their mapping has tp_size > 1, so a single
process never touches torch.distributed.
"""

from __future__ import annotations

import datetime
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


_state: _State | None = None


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


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype everywhere), on the device group."""
    _require()
    dist.broadcast(x, src=src)
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
