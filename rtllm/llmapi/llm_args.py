"""LlmArgs: the LLM constructor's options, validated on construction (TensorRT-LLM names)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from rtllm.config import CudaGraphConfig, EngineConfig, KvCacheConfig, SchedulerConfig
from rtllm.errors import ConfigError
from rtllm.parallel import auto
from rtllm.parallel.mapping import Mapping
from rtllm.quantization.config import QuantConfig

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
_EXECUTOR_TYPES = ("auto", "inprocess", "multiprocess")


@dataclass
class LlmArgs:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    max_batch_size: int = 64
    max_num_tokens: int = 2048
    max_seq_len: int | None = None
    enable_chunked_prefill: bool = True
    device: str = "auto"
    cuda_graph_config: CudaGraphConfig | None = field(default_factory=CudaGraphConfig)
    # "multiprocess": the engine loop runs in a worker process's main thread (torch is slower on a
    # non-main thread); "inprocess": on a background thread of this process; "auto": multiprocess
    executor_type: str = "auto"
    disable_overlap_scheduler: bool = False  # overlap runs on CUDA only (no gain on a synchronous CPU)
    # weight quantization applied at load, e.g. QuantConfig(quant_algo="W4A16", group_size=64); None: none
    quant_config: QuantConfig | None = None
    # the model split across tensor_parallel_size * pipeline_parallel_size ranks, one worker process each
    # (rtllm.parallel.Mapping); MoE layers split the tp group again: moe_tensor * moe_expert == tp.
    # tensor_parallel_size="auto": the smallest power of two that fits the weights and one max_seq_len
    # request's KV cache in the visible GPUs' free memory (rtllm.parallel.auto; 1 on the CPU)
    tensor_parallel_size: int | str = 1
    pipeline_parallel_size: int = 1
    moe_expert_parallel_size: int | None = None
    moe_tensor_parallel_size: int | None = None
    # pipeline parallel: micro-batches in flight between the stages (None: pipeline_parallel_size;
    # 1: one step at a time, each stage idle while the others run)
    num_micro_batches: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"LlmArgs.model={self.model!r}: must be a path to a model directory or .gguf file")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"LlmArgs.dtype={self.dtype!r}: must be one of {_DTYPES}")
        if not isinstance(self.kv_cache_config, KvCacheConfig):
            raise ConfigError(f"LlmArgs.kv_cache_config must be a KvCacheConfig, got {type(self.kv_cache_config)}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"LlmArgs.device={self.device!r}: must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"LlmArgs.device={self.device!r}: no CUDA device is available")
        if self.cuda_graph_config is not None and not isinstance(self.cuda_graph_config, CudaGraphConfig):
            raise ConfigError(f"LlmArgs.cuda_graph_config must be a CudaGraphConfig or None, "
                              f"got {type(self.cuda_graph_config).__name__}")
        if self.executor_type not in _EXECUTOR_TYPES:
            raise ConfigError(f"LlmArgs.executor_type={self.executor_type!r}: must be one of {_EXECUTOR_TYPES}")
        if self.quant_config is not None:
            if not isinstance(self.quant_config, QuantConfig):
                raise ConfigError(f"LlmArgs.quant_config must be a QuantConfig or None, "
                                  f"got {type(self.quant_config).__name__}")
            self.quant_config.check_device(self.device)
        self.scheduler_config = SchedulerConfig(self.max_batch_size, self.max_num_tokens, self.max_seq_len,
                                                self.enable_chunked_prefill)
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "num_micro_batches"):
            v = getattr(self, name)
            if (name == "tensor_parallel_size" and v == "auto") or (name == "num_micro_batches" and v is None):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                extra = {"tensor_parallel_size": " or 'auto'", "num_micro_batches": " or None"}.get(name, "")
                raise ConfigError(f"LlmArgs.{name}={v!r}: must be a positive integer{extra}")
        self.auto_tp: auto.TpChoice | None = None  # what tensor_parallel_size="auto" chose on GPUs, and why
        if self.tensor_parallel_size == "auto":
            self.tensor_parallel_size = self._auto_tp()
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        self.mapping = Mapping(tp * pp, tp, pp, self.moe_tensor_parallel_size, self.moe_expert_parallel_size)
        if self.mapping.world_size > 1 and self.executor_type == "inprocess":
            raise ConfigError(f"LlmArgs.executor_type='inprocess': a model split across ranks (tensor_parallel_size="
                              f"{tp}, pipeline_parallel_size={pp}) runs one worker process per rank; use 'auto'")

    def _auto_tp(self) -> int:
        """tensor_parallel_size="auto": the smallest tp that fits (rtllm.parallel.auto.choose_tp), logged.
        An engine directory loads only at the tp it was built for: that one."""
        from rtllm.models.config import ModelConfig
        from rtllm.models.engine_dir import is_engine_dir, read_engine_config
        from rtllm.models.loader import resolve_dtype
        from rtllm.runtime.py_executor import DEFAULT_MAX_SEQ_LEN

        path = self.model
        if is_engine_dir(path):
            data = read_engine_config(path)
            tp = int(data.get("tp_size", 1))
            # the built pipeline / expert split comes with it (the engine loads only with its own mapping)
            self.pipeline_parallel_size = int(data.get("pp_size", 1))
            if tp * self.pipeline_parallel_size > 1:
                self.moe_expert_parallel_size = int(data.get("moe_ep_size", 1))
            logger.info("tensor_parallel_size='auto' -> %d (pp %d): the engine at %s was built for it", tp,
                        self.pipeline_parallel_size, path)
            return tp
        from rtllm.executor.launcher import launched_rank

        launch = launched_rank()
        if launch is not None:  # ranks started by torchrun: the launch decides (every rank must agree)
            pp = self.pipeline_parallel_size
            if launch.world_size % pp:
                raise ConfigError(f"tensor_parallel_size='auto' under a launcher: WORLD_SIZE={launch.world_size} is "
                                  f"not a multiple of pipeline_parallel_size={pp}")
            logger.info("tensor_parallel_size='auto' -> %d: the launcher started WORLD_SIZE=%d processes (pp %d)",
                        launch.world_size // pp, launch.world_size, pp)
            return launch.world_size // pp
        if not self.device.startswith("cuda"):
            logger.warning("tensor_parallel_size='auto' on the CPU: there are no GPUs to split the model across; "
                           "using 1")
            return 1
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            path = os.path.join(path, "config.json")
        elif not (path.endswith(".json") and os.path.isfile(path)):  # a GGUF file
            logger.warning("tensor_parallel_size='auto': %s has no config.json to size the model from (a GGUF "
                           "file?); using 1", self.model)
            return 1
        config = ModelConfig.from_file(path)
        dtype = resolve_dtype(self.dtype, config.torch_dtype, torch.device("cuda"))
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        q = self.quant_config
        linear = (auto.linear_bytes_per_param(dtype_bytes, q.quant_algo, q.group_size)
                  if q is not None and q.enabled else None)
        kv_bytes = 1 if q is not None and q.kv_cache_quant_algo == "FP8" else dtype_bytes
        tokens = self.max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        choice = auto.choose_tp(config, auto.model_weight_bytes(config, dtype_bytes, linear),
                                auto.kv_bytes_per_token(config, kv_bytes), tokens, auto.visible_gpu_free_bytes(),
                                self.pipeline_parallel_size, self.kv_cache_config.free_gpu_memory_fraction,
                                self.moe_tensor_parallel_size, self.moe_expert_parallel_size)
        logger.info("%s (KV for one request of %d tokens)", choice.describe(), tokens)
        self.auto_tp = choice
        return choice.tp

    @property
    def multi_process(self) -> bool:
        """Whether the engine runs in a worker process ("auto" picks it)."""
        return self.executor_type != "inprocess"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, dtype=self.dtype, device=self.device,
                            kv_cache_config=self.kv_cache_config, scheduler_config=self.scheduler_config,
                            cuda_graph_config=self.cuda_graph_config,
                            overlap=False if self.disable_overlap_scheduler else None,
                            quant_config=self.quant_config,
                            mapping=self.mapping if self.mapping.world_size > 1 else None,
                            num_micro_batches=self.num_micro_batches)
