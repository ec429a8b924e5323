"""Text from outside pvmit (file contents, names in inventories and catalogs, guest serial output, command-line
values) made safe to show: control and invisible formatting characters escaped, long values shortened.

A name in an inventory could hold a terminal escape sequence (retitle the window, hide text, move the cursor), a
right-to-left override that shows 'exe.txt' for 'txt.exe', or a lone surrogate that makes the next write to a
UTF-8 stream raise. Everything that prints such text goes through `safe_text` (the CLI's `esc` does it for rich
output, and every error message passes `clean_message`). Standard library only: the guest agent ships this file.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL; the Unicode format characters that reorder or hide text (bidi embeddings,
# overrides and isolates, marks, zero-width characters, line and paragraph separators, BOM, interlinear
# annotations, tags); lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]")
_UNSAFE_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]")
_LONG_TOKEN = re.compile(r"\S{201,}")
_END_PUNCTUATION = ":;,.'\")]"

DEFAULT_LIMIT = 80
"""Characters of an outside value shown in a message before it is cut."""


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def safe_text(text: str, *, lines: bool = False) -> str:
    """`text` with every control and invisible formatting character written as a Python escape (\\x1b,
    \\u202e); with lines=True newlines and tabs are kept (multi-line text of pvmit's own)."""
    return (_UNSAFE_KEEP_LINES if lines else _UNSAFE).sub(_escape, text)


def shorten(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`safe_text` of at most `limit` characters of `text`, with how long it was when it was cut."""
    if len(text) <= limit:
        return safe_text(text)
    return f"{safe_text(text[:limit])}... ({len(text):,} characters)"


def quoted(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """'text' shortened and escaped: what messages show of a value given from outside (in place of !r)."""
    return f"'{shorten(text, limit)}'"


def clean_message(message: str) -> str:
    """An error message as it may reach a terminal or log: runs of more than 200 characters without a space cut
    to `DEFAULT_LIMIT` (a 5000-digit number, a path of junk; punctuation that ends the run is kept), controls
    escaped, newlines kept."""
    def cut(m: re.Match[str]) -> str:
        body = m.group().rstrip(_END_PUNCTUATION)
        if len(m.group()) - len(body) > 3:  # not the punctuation that ends a value: a run of it
            body = m.group()
        return shorten(body) + m.group()[len(body):]

    return safe_text(_LONG_TOKEN.sub(cut, message), lines=True)
