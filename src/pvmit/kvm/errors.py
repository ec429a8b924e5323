"""Errors from the KVM layer: each names the ioctl (or file) and the errno."""

from __future__ import annotations

import errno as _errno
import os

from pvmit.errors import PvmitError


class KvmError(PvmitError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, what: str, err: int, detail: str = "") -> None:
        self.what = what
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{what} failed: {name} ({os.strerror(err)}){': ' + detail if detail else ''}")


class KvmUnavailable(PvmitError):
    """/dev/kvm cannot be used here; the message says why."""
