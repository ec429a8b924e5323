"""Reading MSRs of this machine through the kernel's msr driver (/dev/cpu/N/msr)."""

from __future__ import annotations

import errno
import os
import struct

from pvmit.userfiles import FileError, open_checked


class MsrUnreadable(Exception):
    """The MSR could not be read; the message says why in words an operator can act on."""


def read_msr(index: int, cpu: int = 0) -> int:
    """RDMSR on CPU `cpu` via /dev/cpu/N/msr (pread of 8 bytes at offset index)."""
    path = f"/dev/cpu/{cpu}/msr"
    try:
        fd = open_checked(path, "the msr device", device=True)
    except FileError as e:
        if e.errno == errno.ENOENT:
            raise MsrUnreadable(f"{path} does not exist: the msr module is not loaded (modprobe msr)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise MsrUnreadable(f"{path}: permission denied (reading MSRs needs root and CAP_SYS_RAWIO)") from None
        raise MsrUnreadable(str(e)) from None
    try:
        data = os.pread(fd, 8, index)
    except OSError as e:
        if e.errno == errno.EIO:
            raise MsrUnreadable(f"MSR {index:#x} is not implemented on CPU {cpu} (RDMSR faulted)") from None
        if e.errno == errno.EPERM:
            raise MsrUnreadable(f"MSR {index:#x}: refused (kernel lockdown or missing CAP_SYS_RAWIO)") from None
        raise MsrUnreadable(f"MSR {index:#x}: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(fd)
    if len(data) != 8:
        raise MsrUnreadable(f"MSR {index:#x}: short read of {len(data)} bytes")
    value: int = struct.unpack("<Q", data)[0]
    return value
