"""Exceptions users can act on. Each names the bad value and where it came from."""


class RtllmError(Exception):
    """Base class for every error rtllm raises on purpose."""


class InvalidRequestError(RtllmError, ValueError):
    """A request (prompt, sampling params) is malformed; only that request fails."""


class ConfigError(RtllmError, ValueError):
    """A configuration field (LlmArgs, KvCacheConfig, BuildConfig, ...) has a wrong value."""


class ModelLoadError(RtllmError):
    """A checkpoint could not be read: missing path, corrupt config or weights."""


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    """config.architectures names a model family rtllm does not implement."""


class RequestFailedError(RtllmError):
    """One request failed inside the engine (e.g. its logits processor raised); the engine goes on."""


class EngineDeadError(RtllmError):
    """The engine loop died; pending and new requests fail with this error."""


class RequestAbortedError(RtllmError):
    """The request was aborted before it finished."""
