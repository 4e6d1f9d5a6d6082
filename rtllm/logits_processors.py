"""Logits processors: per-request callables that edit the next-token logits before sampling.

A processor is ``fn(output_token_ids, logits) -> logits`` or ``fn(prompt_token_ids,
output_token_ids, logits) -> logits``: ``logits`` is this request's row, a float32 [vocab_size]
tensor on the model's device that the processor may edit in place; it returns that row (or a new
tensor of the same shape). Requests list them in ``SamplingParams.logits_processors``; each entry
is one of

- a callable (a module-level function or a picklable object when the engine runs in a worker
  process, which is the default: the request is pickled to it);
- a name given to ``register_logits_processor`` (a processor) or to
  ``register_logits_processor_factory`` (called once per request to make its processor, so it may
  keep per-request state), in a plugin module loaded in every process (rtllm.plugins);
- an import path ``"package.module:attribute"`` of a processor;
- ``{"name": <registered factory name or import path of a factory>, "kwargs": {...}}``: the factory
  called with those arguments once per request (JSON-friendly, for servers).

Processors run in the engine's process, after the model and before penalties, min_tokens and
temperature, in list order; logprobs are those of the processed logits. A processor that raises
(or returns a tensor of another shape) aborts its own request with the error; the engine goes on.

This module sits at the bottom with sampling_params.py: it imports no engine layer.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rtllm.errors import ConfigError, InvalidRequestError

LogitsProcessor = Callable[..., Any]  # (output_ids, logits) -> logits, or (prompt_ids, output_ids, logits) -> logits

_lock = threading.Lock()
_PROCESSORS: dict[str, LogitsProcessor] = {}
_FACTORIES: dict[str, Callable[..., LogitsProcessor]] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or ":" in name or "," in name:
        raise ConfigError(f"logits processor name {name!r}: must be a non-empty string without ':' or ','")
    return name


def _register(table: dict, name: str, fn: Callable | None, what: str):
    _check_name(name)

    def add(f: Callable) -> Callable:
        if not callable(f):
            raise ConfigError(f"{what} {name!r}: {f!r} is not callable")
        with _lock:
            _PROCESSORS.pop(name, None)
            _FACTORIES.pop(name, None)
            table[name] = f
        return f

    return add if fn is None else add(fn)


def register_logits_processor(name: str, fn: LogitsProcessor | None = None):
    """Register ``fn`` (a processor, shared by every request that names it) under ``name``; without
    ``fn``, a decorator. A later registration of the same name replaces the earlier one."""
    return _register(_PROCESSORS, name, fn, "logits processor")


def register_logits_processor_factory(name: str, factory: Callable[..., LogitsProcessor] | None = None):
    """Register ``factory(**kwargs) -> processor`` under ``name``: each request naming it gets its own
    processor (``{"name": name, "kwargs": {...}}``, or just the name for a factory with no arguments)."""
    return _register(_FACTORIES, name, factory, "logits processor factory")


def unregister_logits_processor(name: str) -> None:
    with _lock:
        _PROCESSORS.pop(name, None)
        _FACTORIES.pop(name, None)


def registered_logits_processors() -> dict[str, str]:
    """name -> "processor" | "factory"."""
    with _lock:
        return {**{n: "processor" for n in _PROCESSORS}, **{n: "factory" for n in _FACTORIES}}


def _import_path(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise InvalidRequestError(f"logits processor {path!r} could not be imported: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise InvalidRequestError(f"logits processor {path!r} is not callable")
    return obj


def _lookup(name: str) -> tuple[str, Callable]:
    """("processor" | "factory", object) for a registered name or an import path."""
    if ":" in name:
        return "path", _import_path(name)
    with _lock:
        if name in _PROCESSORS:
            return "processor", _PROCESSORS[name]
        if name in _FACTORIES:
            return "factory", _FACTORIES[name]
        known = sorted(_PROCESSORS) + sorted(_FACTORIES)
    raise InvalidRequestError(f"unknown logits processor {name!r}; registered: {known or 'none'} (register it in a "
                              f"plugin module loaded via RTLLM_PLUGINS or the 'rtllm.plugins' entry point group, or "
                              f"give an import path 'package.module:function')")


def check_entry(entry: object) -> None:
    """Raise InvalidRequestError when ``entry`` is not a valid SamplingParams.logits_processors item
    (types only: names are resolved where the request runs)."""
    if callable(entry) or isinstance(entry, str):
        return
    if isinstance(entry, dict):
        if set(entry) - {"name", "kwargs"} or not isinstance(entry.get("name"), str):
            raise InvalidRequestError(f"logits processor {entry!r}: a dict needs 'name' (str) and optional "
                                      f"'kwargs' (dict), nothing else")
        if not isinstance(entry.get("kwargs", {}), dict):
            raise InvalidRequestError(f"logits processor {entry!r}: 'kwargs' must be a dict")
        return
    raise InvalidRequestError(f"logits processor {entry!r}: must be a callable, a registered name, an import path "
                              f"'module:attr' or {{'name': ..., 'kwargs': {{...}}}}")


def resolve(entry: object) -> LogitsProcessor:
    """The processor an entry stands for (factories are called here: once per request)."""
    check_entry(entry)
    if callable(entry):
        return entry
    if isinstance(entry, str):
        kind, obj = _lookup(entry)
        return obj() if kind == "factory" else obj
    name, kwargs = entry["name"], entry.get("kwargs") or {}
    kind, obj = _lookup(name)
    if kind == "processor":
        raise InvalidRequestError(f"logits processor {name!r} is registered as a processor, not a factory: it takes "
                                  f"no kwargs (register it with register_logits_processor_factory to pass some)")
    try:
        proc = obj(**kwargs)
    except Exception as e:
        raise InvalidRequestError(f"logits processor factory {name!r}({kwargs}) failed: {type(e).__name__}: {e}") from e
    if not callable(proc):
        raise InvalidRequestError(f"logits processor factory {name!r} returned {type(proc).__name__}, not a callable")
    return proc


def resolve_all(entries: Sequence[object] | None) -> list[BoundProcessor]:
    """A request's processors, ready to call: ``p(prompt_ids, output_ids, logits_row)``."""
    return [BoundProcessor(resolve(e)) for e in entries or ()]


def validate(entries: Sequence[object] | None, picklable: bool = False) -> None:
    """Check a request's processors where it is submitted: names exist (or import), and, when the
    engine runs in another process (``picklable``), callables can be sent there."""
    for e in entries or ():
        check_entry(e)
        if isinstance(e, str):
            _lookup(e)
        elif isinstance(e, dict):
            _lookup(e["name"])
        elif picklable:
            try:
                pickle.dumps(e)
            except Exception as err:
                raise InvalidRequestError(
                    f"logits processor {e!r} cannot be sent to the engine's worker process ({type(err).__name__}: "
                    f"{err}): use a module-level function, register it by name in a plugin module "
                    f"(docs/PLUGINS.md), or LLM(executor_type='inprocess')") from err


class BoundProcessor:
    """A resolved processor and its calling convention (2 or 3 required positional arguments)."""

    __slots__ = ("arity", "fn")

    def __init__(self, fn: LogitsProcessor) -> None:
        self.fn = fn
        try:
            required = [p for p in inspect.signature(fn).parameters.values()
                        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
            self.arity = 3 if len(required) >= 3 else 2
        except (TypeError, ValueError):  # no signature (some builtins): the two-argument form
            self.arity = 2

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits):
        if self.arity == 3:
            return self.fn(prompt_ids, output_ids, logits)
        return self.fn(output_ids, logits)

    def __repr__(self) -> str:
        return f"BoundProcessor({getattr(self.fn, '__qualname__', self.fn)!r})"
