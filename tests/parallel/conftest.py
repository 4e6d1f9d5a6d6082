"""Shared fixtures of the parallel tests."""

import pytest

from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint (2 layers, 4 heads, 2 KV heads), written once; a test file that
    needs another shape defines its own ``ckpt``."""
    path = str(tmp_path_factory.mktemp("llama"))
    make_checkpoint(path, "llama")
    return path
