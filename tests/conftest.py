"""Fixtures shared across test files."""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' model for the embedded default GGUF (fp32, dequantized by transformers' own GGUF
    reader): the oracle of several files' tests. Tests must not modify it.

    transformers' GGUF load takes ~15-25 s on the CI machine, and the two pytest workers each need it, so
    the first load is saved with save_pretrained to a cache outside the repo (keyed by the GGUF's size and
    mtime and transformers' version; RTLLM_TEST_CACHE, default ~/.cache/rtllm-tests) under a file lock,
    and later sessions and the other worker read that copy back (~1 s, the same fp32 tensors)."""
    import transformers as tf
    from filelock import FileLock

    from rtllm.llmapi.default_model import default_model_path

    path = default_model_path()
    st = os.stat(path)
    root = os.environ.get("RTLLM_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rtllm-tests")
    cache = os.path.join(root, f"hf-{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}-tf{tf.__version__}")
    os.makedirs(root, exist_ok=True)
    with FileLock(cache + ".lock"):
        if not os.path.isfile(os.path.join(cache, "config.json")):
            model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32)
            model.config.quantization_config = None  # the GGUF marker: the weights are plain fp32 here
            model.hf_quantizer = None
            model.save_pretrained(cache + ".tmp")
            os.replace(cache + ".tmp", cache)
            return model.eval()
    return tf.AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
