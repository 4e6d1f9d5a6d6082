"""Per-device buffers that kernels keep across launches (split-K workspaces, arrival counters).

A captured CUDA graph keeps pointing at the memory its launches used, so such a buffer must be allocated
outside any capture and live as long as the process: :func:`device_buffer` makes it on first use and
returns None when that first use is inside a capture (the caller then takes a path without it; the
engine runs each batch size once before capturing it, so its buffers exist by then). Launches sharing a
buffer run one after another (one stream), as a model's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_buffers: dict[tuple[str, str, int | None], object] = {}


def device_buffer(name: str, device: torch.device, make: Callable[[], T]) -> T | None:
    """The buffer ``name`` of ``device``, made by ``make()`` the first time (outside a CUDA-graph
    capture), or None during a capture before it exists."""
    key = (name, device.type, device.index)
    buf = _buffers.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _buffers[key] = make()
    return buf  # type: ignore[return-value]
