"""Shortening what goes into an error message: a user's value (a flag, a cell, a metadata entry) can be
megabytes long, and a message must stay one readable line."""
from __future__ import annotations

LIMIT = 80


def shorten(text: str, limit: int = LIMIT) -> str:
    """`text` on one line, cut in the middle to at most about `limit` characters."""
    text = " ".join(str(text).split()) if ("\n" in str(text) or "\r" in str(text)) else str(text)
    if len(text) <= limit:
        return text
    keep = max(8, limit - 20)
    return f"{text[:keep * 2 // 3]}…[{len(text)} chars]…{text[-(keep // 3):]}"


def quoted(value, limit: int = LIMIT) -> str:
    """repr(value), shortened: for quoting a value the user gave."""
    return shorten(repr(value), limit)
