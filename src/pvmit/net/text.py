"""Text from outside (a peer's host name, a guest's serial line, a client's command) made safe to print or log.

Control characters (terminal escape sequences among them), bidirectional overrides and other invisible format
characters, and unpaired surrogates are shown as escapes (`\\x1b`, `\\u202e`), so that what reaches a terminal or
a log is what was received, visibly, and can move neither the cursor nor the reading order. The result is plain
printable text, so escaping twice (a message built from an escaped name, then logged) changes nothing more.

The rule itself lives in `pvmit.safetext`, shared with the readers of files and the guest agent; these are the
names the network side uses.
"""

from __future__ import annotations

from pvmit.safetext import safe_text as printable
from pvmit.safetext import shorten as _shorten

DEFAULT_LIMIT = 200


def shorten(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`printable(text)`, cut to about `limit` characters with a note of the original length."""
    return _shorten(text, limit)


__all__ = ["printable", "shorten"]
