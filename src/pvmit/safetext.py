"""Text from outside pvmit (file contents, names in inventories and catalogs, guest serial output, command-line
values) made safe to show: control and invisible formatting characters escaped, long values shortened.

A name in an inventory could hold a terminal escape sequence (retitle the window, hide text, move the cursor), a
right-to-left override that shows 'exe.txt' for 'txt.exe', or a lone surrogate that makes the next write to a
UTF-8 stream raise. Everything that prints such text goes through `safe_text` (the CLI's `esc` does it for rich
output, and every error message passes `clean_message`). Standard library only: the guest agent ships this file.
"""

from __future__ import annotations

import re
import unicodedata

_HIDDEN = frozenset(("Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
"""Categories escaped although str.isprintable() may pass them: format characters (bidi overrides and isolates,
zero-width characters, tags), surrogates, private use, unassigned, line and paragraph separators."""
_LONG_TOKEN = re.compile(r"\S{401,}")
_END_PUNCTUATION = ":;,.'\")]"

DEFAULT_LIMIT = 80
"""Characters of an outside value shown in a message before it is cut."""


def _escape(ch: str) -> str:
    c = ord(ch)
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def safe_text(text: str, *, lines: bool = False) -> str:
    """`text` with every character that is not safe on a terminal (controls, escape sequences' ESC among them,
    and the invisible and reordering characters of `_HIDDEN`) written as a Python escape (\\x1b, \\u202e); with
    lines=True newlines and tabs are kept (multi-line text of pvmit's own). The result is printable, so escaping
    it again changes nothing."""
    if text.isascii() and text.isprintable():
        return text  # the common case, quickly
    return "".join(ch if (ch.isprintable() and unicodedata.category(ch) not in _HIDDEN)
                   or (lines and ch in "\n\t") else _escape(ch) for ch in text)


def shorten(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`safe_text(text)` if that is at most `limit` characters long; else as many whole characters of `text` as fit
    in `limit` once escaped (an escape is up to 10 characters for one), with how long `text` was."""
    if len(text) <= limit:
        shown = safe_text(text)
        if len(shown) <= limit:
            return shown
    kept, used = [], 0
    for ch in text:
        piece = safe_text(ch)
        if used + len(piece) > limit:
            break
        kept.append(piece)
        used += len(piece)
    return f"{''.join(kept)}... ({len(text):,} characters)"


def quoted(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """'text' shortened and escaped: what messages show of a value given from outside (in place of !r)."""
    return f"'{shorten(text, limit)}'"


def clean_message(message: str) -> str:
    """An error message as it may reach a terminal or log: runs of more than 400 characters without a space cut
    to `DEFAULT_LIMIT` (a 5000-digit number, a path of junk; punctuation that ends the run is kept), controls
    escaped, newlines kept."""
    def cut(m: re.Match[str]) -> str:
        body = m.group().rstrip(_END_PUNCTUATION)
        if len(m.group()) - len(body) > 3:  # not the punctuation that ends a value: a run of it
            body = m.group()
        return shorten(body) + m.group()[len(body):]

    return safe_text(_LONG_TOKEN.sub(cut, message), lines=True)
