"""The runtime limits of an engine directory: its BuildConfig's values are the defaults and ceilings.

``LLM(engine_dir)`` asks ``runtime_limits`` for max_batch_size, max_num_tokens, max_seq_len and the
KV block size: a value the user leaves out (None) comes from the build; one above what was built is a
ConfigError naming the field and the engine's limit. Prompts longer than ``max_input_len`` are
refused per request. For a checkpoint (no engine) the LLM's own defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtllm.builder.build_config import BuildConfig
from rtllm.config import KvCacheConfig
from rtllm.errors import ConfigError, ModelLoadError
from rtllm.models.engine_dir import is_engine_dir, read_engine_config

# LLM's defaults for a checkpoint that is not an engine directory
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_NUM_TOKENS = 2048


@dataclass(frozen=True)
class EngineLimits:
    path: str
    build_config: BuildConfig
    has_tokenizer: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @property
    def max_input_len(self) -> int:
        return self.build_config.max_input_len


def engine_limits(path: str) -> EngineLimits | None:
    """The limits stored in the engine directory ``path``; None when ``path`` is not one."""
    if not is_engine_dir(path):
        return None
    data = read_engine_config(path)
    try:
        bc = BuildConfig.from_dict(data["build_config"])
    except (ConfigError, TypeError) as e:
        raise ModelLoadError(f"{path}: the stored build config is invalid ({e}): rebuild the engine") from e
    pc = data["pretrained_config"]
    eos = pc.get("eos_token_id")
    eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    return EngineLimits(path, bc, bool(data.get("tokenizer_files")), int(pc.get("vocab_size", 0)), eos_ids)


def runtime_limits(limits: EngineLimits | None, max_batch_size: int | None, max_num_tokens: int | None,
                   max_seq_len: int | None, kv_cache_config: KvCacheConfig | None,
                   ) -> tuple[int, int, int | None, KvCacheConfig | None]:
    """(max_batch_size, max_num_tokens, max_seq_len, kv_cache_config) for the runtime."""
    if limits is None:
        return (DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
                DEFAULT_MAX_NUM_TOKENS if max_num_tokens is None else max_num_tokens, max_seq_len, kv_cache_config)
    bc = limits.build_config
    out = {}
    for name, value in (("max_batch_size", max_batch_size), ("max_num_tokens", max_num_tokens),
                        ("max_seq_len", max_seq_len)):
        built = getattr(bc, name)
        if value is None:
            value = built
        elif isinstance(value, int) and built is not None and value > built:
            raise ConfigError(f"LlmArgs.{name}={value}: the engine at {limits.path!r} was built with "
                              f"{name}={built}; use at most that (or rebuild with a larger limit)")
        out[name] = value
    if kv_cache_config is None:  # a KvCacheConfig the user gives stands: the build's block size is a default
        kv_cache_config = KvCacheConfig(tokens_per_block=bc.tokens_per_block)
    return out["max_batch_size"], out["max_num_tokens"], out["max_seq_len"], kv_cache_config
