"""Engine-wide configuration objects shared by the runtime and the user API.

Each validates itself when built: a wrong value fails at once with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtllm.errors import ConfigError


def _check(cond: bool, owner: str, name: str, value: object, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{owner}.{name}={value!r}: {rule}")


@dataclass
class KvCacheConfig:
    """Paged KV cache sizing (TensorRT-LLM names).

    max_tokens: capacity in tokens; None sizes the pool from free memory (GPU) or a
    default budget (CPU). free_gpu_memory_fraction: share of the free GPU memory left
    after weights and a profiling pass that the pool may take. tokens_per_block: tokens
    per KV block. enable_block_reuse: share full blocks between requests by prefix hash.
    """

    max_tokens: int | None = None
    free_gpu_memory_fraction: float = 0.9
    enable_block_reuse: bool = True
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        o = "KvCacheConfig"
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens > 0),
               o, "max_tokens", self.max_tokens, "must be a positive integer or None")
        _check(0.0 < self.free_gpu_memory_fraction <= 1.0, o, "free_gpu_memory_fraction",
               self.free_gpu_memory_fraction, "must be in (0, 1]")
        _check(isinstance(self.tokens_per_block, int) and self.tokens_per_block > 0
               and self.tokens_per_block & (self.tokens_per_block - 1) == 0,
               o, "tokens_per_block", self.tokens_per_block, "must be a positive power of two")


@dataclass
class SchedulerConfig:
    """Limits the scheduler enforces at every step.

    max_batch_size: requests in the running batch. max_num_tokens: tokens computed per step
    (the token budget shared by decodes and prefill chunks). max_seq_len: prompt + output
    tokens of one request. enable_chunked_prefill: split prompts longer than the remaining
    budget across steps (otherwise a prompt must fit the budget whole).
    """

    max_batch_size: int = 64
    max_num_tokens: int = 2048
    max_seq_len: int | None = None  # None: the model's context length, capped at 8192
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        o = "SchedulerConfig"
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            v = getattr(self, name)
            if v is None and name == "max_seq_len":
                continue
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, o, name, v,
                   "must be a positive integer")
        _check(self.max_num_tokens >= self.max_batch_size, o, "max_num_tokens", self.max_num_tokens,
               f"must be >= max_batch_size={self.max_batch_size} so every running request can decode")
        if not self.enable_chunked_prefill and self.max_seq_len is not None:
            _check(self.max_num_tokens >= self.max_seq_len, o, "max_num_tokens", self.max_num_tokens,
                   f"must be >= max_seq_len={self.max_seq_len} when chunked prefill is off")


@dataclass
class EngineConfig:
    """Everything the runtime needs to build one engine (validated by LlmArgs upstream)."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    kv_cache_config: KvCacheConfig | None = None
    scheduler_config: SchedulerConfig | None = None
    cuda_graph_config: CudaGraphConfig | None = None  # None: no CUDA graphs
    overlap: bool | None = None  # overlap scheduling; None: on for CUDA, off for CPU
    cpu_kv_cache_bytes: int = 2 << 30  # CPU default KV budget when kv_cache_config.max_tokens is None
    # a rtllm.quantization.QuantConfig or None (typed loosely: this bottom module imports nothing
    # above it; LlmArgs validates it), handed to load_model
    quant_config: object | None = None
    # a rtllm.parallel.Mapping (typed loosely, as quant_config) when the model is split across ranks
    # (tensor / pipeline parallel); each rank's engine gets it with its own rank. None: one process
    mapping: object | None = None
    # pipeline parallel: micro-batches in flight between the stages (None: pp_size; 1: one step at a time)
    num_micro_batches: int | None = None

    def __post_init__(self) -> None:
        _check(self.num_micro_batches is None or (isinstance(self.num_micro_batches, int)
                                                  and not isinstance(self.num_micro_batches, bool)
                                                  and self.num_micro_batches > 0),
               "EngineConfig", "num_micro_batches", self.num_micro_batches, "must be a positive integer or None")
        self.kv_cache_config = self.kv_cache_config or KvCacheConfig()
        self.scheduler_config = self.scheduler_config or SchedulerConfig()


@dataclass
class CudaGraphConfig:
    """CUDA graphs for decode steps (TensorRT-LLM's name). Captured for a ladder of batch sizes up
    to max_batch_size, or for exactly ``batch_sizes`` when given (max_batch_size then becomes their
    largest, as in TensorRT-LLM); a decode batch is padded to the next captured size. Sizes above
    the engine's max_batch_size are not captured. None in LlmArgs turns graphs off."""

    max_batch_size: int = 256
    batch_sizes: list[int] | None = None
    enable_padding: bool = True

    def __post_init__(self) -> None:
        o = "CudaGraphConfig"
        _check(isinstance(self.max_batch_size, int) and self.max_batch_size > 0, o, "max_batch_size",
               self.max_batch_size, "must be a positive integer")
        if self.batch_sizes is not None:
            _check(bool(self.batch_sizes) and all(isinstance(b, int) and b > 0 for b in self.batch_sizes),
                   o, "batch_sizes", self.batch_sizes, "must be a non-empty list of positive integers")
            self.max_batch_size = max(self.batch_sizes)

    def capture_sizes(self, limit: int) -> list[int]:
        """The batch sizes to capture, ascending, none above ``limit``."""
        top = min(self.max_batch_size, limit)
        if self.batch_sizes is not None:
            return sorted({b for b in self.batch_sizes if b <= top})
        ladder = [1, 2, 4, 8] + list(range(16, top + 1, 16))
        sizes = {b for b in ladder if b <= top} | {top}
        return sorted(sizes)
