"""Model registry keyed by config.architectures.

A new architecture is one module plus ``register_model("XForCausalLM")`` on its class. Plugins
(docs/PLUGINS.md) call the same function from their own package, as a decorator or as
``register_model("XForCausalLM", cls)``; ``weight_name_map`` translates their checkpoints'
tensor names to the model's parameter names (None: skip the tensor) before ``load_weights``.

What a model class provides (the Llama family in rtllm.models.llama is the reference):
``__init__(config: ModelConfig, max_positions: int | None)``; ``forward(input_ids, positions,
meta: AttentionMetadata) -> hidden [T, hidden]``; ``compute_logits(hidden) -> [T, vocab]``;
``attention_layers() -> list[rtllm.layers.attention.Attention]`` (the runtime binds their KV
cache); ``load_weights(iterable of (name, tensor)) -> set of parameter names loaded``; and
``model.embed_tokens.weight`` (the engine reports its size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rtllm.errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type] = {}
_NAME_MAPS: dict[type, Callable[[str], str | None]] = {}
_REQUIRED = ("forward", "compute_logits", "attention_layers", "load_weights")


def _register(names: tuple[str, ...], cls: type, weight_name_map: Callable[[str], str | None] | None) -> type:
    if not isinstance(cls, type):
        raise TypeError(f"register_model: {cls!r} is not a class")
    missing = [m for m in _REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(f"register_model: {cls.__qualname__} lacks {missing} (see rtllm.models.registry)")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"register_model: architecture names must be non-empty strings, got {names!r}")
    if weight_name_map is not None and not callable(weight_name_map):
        raise TypeError(f"register_model: weight_name_map must be callable, got {weight_name_map!r}")
    for n in names:
        old = _REGISTRY.get(n)
        if old is not None and old is not cls:
            logger.warning("architecture %s: %s.%s replaces %s.%s", n, cls.__module__, cls.__qualname__,
                           old.__module__, old.__qualname__)
        _REGISTRY[n] = cls
    if weight_name_map is not None:
        _NAME_MAPS[cls] = weight_name_map
    return cls


def register_model(*names, weight_name_map: Callable[[str], str | None] | None = None):
    """Register a model class under one or more ``config.architectures`` names.

    ``@register_model("AForCausalLM", "BForCausalLM")`` on a class, or ``register_model("AForCausalLM",
    cls)``. A name registered again is taken by the newer class (logged)."""
    if names and isinstance(names[-1], type):
        return _register(tuple(names[:-1]), names[-1], weight_name_map)

    def deco(cls: type) -> type:
        return _register(tuple(names), cls, weight_name_map)

    return deco


def weight_name_map(cls: type) -> Callable[[str], str | None] | None:
    """The checkpoint-name map registered with ``cls`` (None: names are the model's own)."""
    return _NAME_MAPS.get(cls)


def supported_architectures() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def get_model_class(architectures: list[str]) -> type:
    _import_builtin_models()
    for arch in architectures:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {architectures!r}; supported: {', '.join(sorted(_REGISTRY))} (a plugin can add "
        f"one: docs/PLUGINS.md)"
    )


def _import_builtin_models() -> None:
    from rtllm.models import llama, mixtral, qwen3_moe  # noqa: F401  (register on import)
    from rtllm.plugins import load_plugins

    load_plugins()  # user packages may register more (once per process)
