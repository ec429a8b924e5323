"""Text from outside (a peer's host name, a guest's serial line, a client's command) made safe to print or log.

Control characters (terminal escape sequences among them), bidirectional overrides and other invisible format
characters, and unpaired surrogates are shown as escapes (`\\x1b`, `\\u202e`), so that what reaches a terminal or
a log is what was received, visibly, and can move neither the cursor nor the reading order. The result is plain
printable text, so escaping twice (a message built from an escaped name, then logged) changes nothing more.
"""

from __future__ import annotations

import unicodedata

DEFAULT_LIMIT = 200


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every character that is not safe on a terminal written as an escape."""
    if text.isascii() and text.isprintable():
        return text  # the common case, quickly
    out = []
    for ch in text:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


def shorten(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`printable(text)`, cut to about `limit` characters with a note of the original length."""
    if len(text) > limit:
        return printable(text[:limit]) + f"... ({len(text)} characters)"
    return printable(text)


__all__ = ["printable", "shorten"]
