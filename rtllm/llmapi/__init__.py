from rtllm.config import KvCacheConfig
from rtllm.executor.result import CompletionOutput, RequestOutput
from rtllm.llmapi.llm import LLM
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.quantization.config import QuantConfig
from rtllm.sampling_params import SamplingParams

__all__ = ["LLM", "LlmArgs", "KvCacheConfig", "QuantConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
