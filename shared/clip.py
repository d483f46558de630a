"""Quoting untrusted values in error messages and logs without echoing them whole.

A client or a peer may send a 1 MiB name; an error that quotes it must not send it back, nor write
it to the log. Every place that puts a value it did not choose into a message uses these.
"""

from __future__ import annotations

from typing import Any

# The most characters of a bad value an error message or a log line quotes.
MAX_QUOTE_CHARS = 100
# The longest error message a daemon sends (ErrorReply.message): a backstop for messages that
# embed a value without quoting it through here.
MAX_ERROR_CHARS = 200
ELLIPSIS = "..."


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """``text`` itself if it has at most ``limit`` characters, else its first ones and ``...``
    (``limit`` characters in all)."""
    if len(text) <= limit:
        return text
    return text[: max(limit - len(ELLIPSIS), 0)] + ELLIPSIS


def quote(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)``, clipped to ``limit`` characters. The repr of a huge value is only built
    from a prefix of it, so quoting a 1 MiB string costs no more than quoting a short one."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        return clip(repr(value[:limit]), limit)
    return clip(repr(value), limit)


__all__ = ["ELLIPSIS", "MAX_ERROR_CHARS", "MAX_QUOTE_CHARS", "clip", "quote"]
