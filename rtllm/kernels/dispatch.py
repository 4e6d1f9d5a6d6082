"""Device dispatch shared by all kernels."""

from __future__ import annotations

import os

import torch

_force_reference = os.environ.get("RTLLM_KERNELS", "").lower() == "reference"


def use_reference(flag: bool = True) -> None:
    """Force (or stop forcing) the torch reference of every kernel."""
    global _force_reference
    _force_reference = flag


def triton_enabled(t: torch.Tensor) -> bool:
    """True when the Triton version of a kernel should run on tensor ``t``.

    Triton runs on CUDA tensors. On CPU it runs only under TRITON_INTERPRET=1, and only
    when a test asks for it explicitly by calling the ``*_triton`` function itself.
    """
    return t.is_cuda and not _force_reference


# --------------------------------------------------------------------------------------------
# Custom kernels (plugins): a registered function replaces rtllm's kernel of that name on a device.

#: the kernels a plugin may replace, with the signature its function must have
KERNEL_SIGNATURES: dict[str, str] = {
    "linear": "(x [.., K], weight [N, K], bias [N] | None) -> x @ weight.T + bias  (every dense Linear)",
    "rms_norm": "(x [T, H], weight [H], eps) -> rms_norm(x) * weight",
    "fused_add_rms_norm": "(x, residual, weight, eps) -> (rms_norm(x + residual) * weight, x + residual)",
    "silu_and_mul": "(x [T, 2I]) -> silu(x[:, :I]) * x[:, I:]",
    "paged_decode_attention": "(q [B, Hq, D], k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len) "
                              "-> [B, Hq, D]",
    "paged_prefill_attention": "(q [T, Hq, D], k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, "
                               "max_query_len, max_seq_len) -> [T, Hq, D]",
}
_DEVICES = ("cpu", "cuda", "any")
_custom: dict[str, dict[str, object]] = {}  # kernel name -> device type ("any" too) -> function


def register_kernel(name: str, fn=None, *, device: str = "any"):
    """Use ``fn`` instead of rtllm's kernel ``name`` for tensors on ``device`` ("cpu", "cuda" or "any";
    a device-specific registration wins over "any"). Without ``fn``, a decorator. The signatures are
    in KERNEL_SIGNATURES. Register before the engine starts: CUDA graphs capture whatever ran then."""
    if name not in KERNEL_SIGNATURES:
        raise ValueError(f"register_kernel: unknown kernel {name!r}; replaceable: {sorted(KERNEL_SIGNATURES)}")
    if device not in _DEVICES:
        raise ValueError(f"register_kernel: device={device!r} must be one of {_DEVICES}")

    def add(f):
        if not callable(f):
            raise ValueError(f"register_kernel({name!r}): {f!r} is not callable")
        _custom.setdefault(name, {})[device] = f
        return f

    return add if fn is None else add(fn)


def unregister_kernel(name: str, device: str = "any") -> None:
    """Go back to rtllm's kernel ``name`` on ``device``."""
    table = _custom.get(name)
    if table is not None:
        table.pop(device, None)
        if not table:
            del _custom[name]


def registered_kernels() -> dict[str, dict[str, object]]:
    """kernel name -> device -> the registered function."""
    return {k: dict(v) for k, v in _custom.items()}


def custom_kernel(name: str, t: torch.Tensor):
    """The function registered for kernel ``name`` on ``t``'s device, or None (the common, fast case)."""
    if not _custom:
        return None
    table = _custom.get(name)
    if table is None:
        return None
    return table.get(t.device.type) or table.get("any")
