"""rtllm: a Python LLM inference engine with inflight batching over a paged KV cache."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import rtllm` stays cheap (the CLI parses args before importing torch).
    if name in ("LLM", "LlmArgs", "KvCacheConfig", "QuantConfig", "SamplingParams", "RequestOutput",
                "CompletionOutput"):
        from rtllm import llmapi

        return getattr(llmapi, name)
    raise AttributeError(f"module 'rtllm' has no attribute {name!r}")


__all__ = ["LLM", "LlmArgs", "KvCacheConfig", "QuantConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
