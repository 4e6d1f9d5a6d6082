import pytest

from tests.serve.harness import ServerProc
from tests.tiny import make_checkpoint

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-serve")
    make_checkpoint(str(path), "llama", seed=3)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_dir):
    """A tiny fp32 model behind `rtllm serve` with an API key, a small body limit and context."""
    s = ServerProc(tiny_dir, "--dtype", "float32", "--max-batch-size", "64", "--max-seq-len", "256",
                   "--max-num-tokens", "512", "--api-key", API_KEY, "--max-body-bytes", "65536",
                   "--served-model-name", "tiny")
    try:
        yield s.wait_ready()
    finally:
        s.close()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
