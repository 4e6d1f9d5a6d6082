"""Plugin discovery: user packages that register architectures, kernels and logits processors.

A plugin is a Python module (or a ``module:function``) that, when imported or called, registers
things through rtllm's public registries (docs/PLUGINS.md):

- ``rtllm.models.registry.register_model``: a model architecture (and a checkpoint-name map);
- ``rtllm.kernels.dispatch.register_kernel``: a kernel that replaces one of rtllm's (dense GEMM,
  RMSNorm, SiLU-and-mul, paged attention) on a device;
- ``rtllm.logits_processors.register_logits_processor`` / ``register_logits_processor_factory``: a
  logits processor requests can name.

``load_plugins()`` loads, once per process, every entry point in the ``rtllm.plugins`` group
(``[project.entry-points."rtllm.plugins"]`` in the plugin's pyproject.toml) and every module named
in the ``RTLLM_PLUGINS`` environment variable (comma-separated; ``module`` or ``module:function``).
An entry point or name that resolves to a callable is called with no arguments. rtllm calls it
when an engine starts (in the worker process too: a spawned worker inherits the environment),
when ``LLM`` is built, when a model class is looked up and when ``rtllm build`` runs, so a plugin's
names are known wherever requests are validated and models are built. A plugin that fails to
import or register raises a ConfigError naming it (set ``RTLLM_PLUGINS_DISABLE_ENTRY_POINTS=1`` to
skip installed entry points).

This module sits at the bottom with errors.py: it imports no engine layer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterable

from rtllm.errors import ConfigError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rtllm.plugins"
ENV_VAR = "RTLLM_PLUGINS"
DISABLE_ENTRY_POINTS_ENV = "RTLLM_PLUGINS_DISABLE_ENTRY_POINTS"

_lock = threading.RLock()
_loaded: dict[str, str] = {}  # plugin spec -> where it came from ("entry point <name>" / "RTLLM_PLUGINS")
_loading = False


def loaded_plugins() -> dict[str, str]:
    """The plugins loaded in this process: spec -> source."""
    return dict(_loaded)


def _env_specs() -> list[str]:
    return [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]


def _load_spec(spec: str, source: str) -> None:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as e:
        raise ConfigError(f"plugin {spec!r} ({source}) could not be imported: {type(e).__name__}: {e}") from e
    _call(obj, spec, source, is_module=not attr)


def _call(obj: object, spec: str, source: str, is_module: bool) -> None:
    if is_module or not callable(obj):
        return
    try:
        obj()
    except Exception as e:
        raise ConfigError(f"plugin {spec!r} ({source}) failed while registering: {type(e).__name__}: {e}") from e


def load_plugins(extra: Iterable[str] = ()) -> list[str]:
    """Load every plugin not loaded yet (entry points, RTLLM_PLUGINS, then ``extra``); idempotent
    and thread-safe. Returns the specs loaded by this call."""
    global _loading
    new: list[str] = []
    with _lock:
        if _loading:  # a plugin being imported looked up a model class: do not recurse
            return new
        _loading = True
        try:
            if not os.environ.get(DISABLE_ENTRY_POINTS_ENV):
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    key = f"{ep.value}"
                    if key in _loaded:
                        continue
                    source = f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r}"
                    try:
                        obj = ep.load()
                    except Exception as e:
                        raise ConfigError(f"plugin {ep.value!r} ({source}) could not be imported: "
                                          f"{type(e).__name__}: {e}") from e
                    _call(obj, ep.value, source, is_module=":" not in ep.value)
                    _loaded[key] = source
                    new.append(key)
            for spec, source in [(s, ENV_VAR) for s in _env_specs()] + [(s, "load_plugins()") for s in extra]:
                if spec in _loaded:
                    continue
                _load_spec(spec, source)
                _loaded[spec] = source
                new.append(spec)
        finally:
            _loading = False
    if new:
        logger.info("loaded rtllm plugins: %s", ", ".join(new))
    return new
