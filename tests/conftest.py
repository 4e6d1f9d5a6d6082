"""Fixtures shared across test files."""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' model for the embedded default GGUF (fp32, dequantized by transformers' own GGUF
    reader): the oracle of several files' tests, loaded once per session (~15 s on the CI machine).
    Tests must not modify it."""
    import transformers as tf

    from rtllm.llmapi.default_model import default_model_path

    path = default_model_path()
    return tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   dtype=torch.float32).eval()
