"""Model registry keyed by config.architectures.

A new architecture is one module plus ``register_model("XForCausalLM")`` on its class.
Plugins call the same function from their own package.
"""

from __future__ import annotations

from collections.abc import Callable

from rtllm.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, type] = {}


def register_model(*names: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for n in names:
            _REGISTRY[n] = cls
        return cls

    return deco


def supported_architectures() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def get_model_class(architectures: list[str]) -> type:
    _import_builtin_models()
    for arch in architectures:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {architectures!r}; supported: {', '.join(sorted(_REGISTRY))}"
    )


def _import_builtin_models() -> None:
    from rtllm.models import llama  # noqa: F401  (registers on import)
