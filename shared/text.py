"""Text PostgreSQL can store: no NUL character, valid Unicode.

PostgreSQL's text (and jsonb) refuses U+0000, and a Python str that holds a lone surrogate (a
``\\udcff`` escape in a vendor's JSON, an undecodable byte read with ``surrogateescape``)
cannot be encoded as UTF-8 at all. Both come from outside: vendors' records and error texts.
"""

from __future__ import annotations

from typing import Any

NUL = "\x00"
REPLACEMENT = "\ufffd"


def is_storable(text: str) -> bool:
    """True when PostgreSQL can store ``text`` as it is (fast for ASCII)."""
    if NUL in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(text: str, nul: str | None = REPLACEMENT) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD and each NUL by ``nul`` (None:
    NUL kept, for text that never reaches the database, e.g. JSON on the bus)."""
    if nul is not None and NUL in text:
        text = text.replace(NUL, nul)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # a surrogate pair becomes its character again, a lone surrogate U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def clean_value(value: Any, nul: str | None = REPLACEMENT) -> Any:
    """``clean_text`` on every string in a JSON-like value (keys of mappings too)."""
    if isinstance(value, str):
        return clean_text(value, nul)
    if isinstance(value, dict):
        return {clean_value(k, nul): clean_value(v, nul) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_value(v, nul) for v in value]
    return value
