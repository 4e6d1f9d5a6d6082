"""Per-rank weight reads: a checkpoint tensor read lazily, so a rank reads only its shard.

The loader wraps each safetensors entry in a ``LazyTensor`` (``safe_open(...).get_slice``) when the
model is split across ranks; a tensor-parallel layer's weight loader asks ``narrow(t, dim, start,
size)`` for its slice, which reads just those bytes from the memory-mapped file, and everything
else calls ``materialize(t)`` (the whole tensor). Plain tensors (GGUF, tests) go through the same
two functions. ``bytes_read()`` counts what lazy tensors read in this process, for tests and logs.
"""

from __future__ import annotations

import torch

_bytes_read = 0


def bytes_read() -> int:
    """Bytes that LazyTensors have read in this process so far."""
    return _bytes_read


def _count(t: torch.Tensor) -> torch.Tensor:
    global _bytes_read
    _bytes_read += t.numel() * t.element_size()
    return t


class LazyTensor:
    """A checkpoint tensor not read yet: ``shape`` is known, bytes are read on ``narrow`` / ``materialize``."""

    def __init__(self, source) -> None:  # a safetensors PySafeSlice (or anything with get_shape and [...])
        self._source = source
        self.shape = torch.Size(source.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def read(self, dim: int | None = None, start: int = 0, size: int | None = None) -> torch.Tensor:
        if dim is None:
            return _count(self._source[:] if self.shape else self._source[()])
        dim = dim % len(self.shape)
        index = (slice(None),) * dim + (slice(start, start + size),)
        return _count(self._source[index])

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)})"


def materialize(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    return t.read() if isinstance(t, LazyTensor) else t


def narrow(t: torch.Tensor | LazyTensor, dim: int, start: int, size: int) -> torch.Tensor:
    """Elements [start, start + size) of ``t`` along ``dim``; only those are read from a LazyTensor."""
    if isinstance(t, LazyTensor):
        return t.read(dim, start, size)
    return t.narrow(dim, start, size)
