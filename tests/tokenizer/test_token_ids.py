"""The tokenizer of bare-config (random-weight) models: id prompts only, one visible delta per token."""

import pytest

from rtllm.errors import InvalidRequestError
from rtllm.tokenizer import IncrementalDetokenizer
from rtllm.tokenizer.token_ids import TokenIdTokenizer


def test_decode_and_streaming_deltas():
    tok = TokenIdTokenizer(1000, [2])
    ids = [5, 17, 999, 0]
    assert tok.decode(ids) == " 5 17 999 0"
    with pytest.raises(InvalidRequestError, match="token-id prompts"):
        tok.encode("hello")
    assert 2 in tok.eos_token_ids
    det = IncrementalDetokenizer(tok)
    deltas = []
    for i in ids:
        det.append(i)
        deltas.append(det.pop_delta())
    deltas.append(det.finish())
    assert deltas[:4] == [" 5", " 17", " 999", " 0"] and "".join(deltas) == tok.decode(ids)
