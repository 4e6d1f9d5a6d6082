"""Compute kernels: each Triton kernel sits beside its plain-torch reference in one module.

Kernels know nothing of the engine: they take tensors and return tensors. Every public
function dispatches by device: Triton on CUDA (when available), the torch reference
elsewhere. ``use_reference(True)`` forces the references everywhere (tests, debugging).
"""

from rtllm.kernels.dispatch import triton_enabled, use_reference

__all__ = ["triton_enabled", "use_reference"]
