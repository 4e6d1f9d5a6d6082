"""The builder: ``build(model, BuildConfig, output_dir)`` writes an engine directory that
``LLM(engine_dir)`` loads without re-quantizing (layout: rtllm.models.engine_dir)."""

from rtllm.builder.build import BuildResult, build, export_gguf_tokenizer
from rtllm.builder.build_config import BuildConfig
from rtllm.builder.limits import EngineLimits, engine_limits, runtime_limits

__all__ = ["BuildConfig", "BuildResult", "EngineLimits", "build", "engine_limits", "export_gguf_tokenizer",
           "runtime_limits"]
