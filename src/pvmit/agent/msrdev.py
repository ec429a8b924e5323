"""The kernel's msr driver (/dev/cpu/N/msr), with each errno turned into the failure an operator can act on; also
the other files the agent reads about the kernel: online CPUs, lockdown state.

msr driver (arch/x86/kernel/msr.c): open needs CAP_SYS_RAWIO (EPERM) and the device is root-only (EACCES);
RDMSR/WRMSR that fault give EIO; writes are refused with EPERM under kernel lockdown (LOCKDOWN_MSR) or
msr.allow_writes=off. Every accepted write taints the kernel (TAINT_CPU_OUT_OF_SPEC) and may log
"Write to unrecognized MSR": the price of doing from user space what a kernel driver would do.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from pvmit.agent.errors import AgentError, Status
from pvmit.userfiles import FileError, KiB, open_checked, read_bytes

LOCKDOWN = Path("/sys/kernel/security/lockdown")
MSR_ALLOW_WRITES = Path("/sys/module/msr/parameters/allow_writes")
KERNEL_FILE_CAP = 64 * KiB
"""Most read of a /sys or /proc file (a sysfs attribute is one page; the command line at most a few KiB)."""


def open_error(path: str, e: OSError, module: str) -> AgentError:
    if e.errno == errno.ENXIO:
        return AgentError(Status.FAILED, f"{path}: that CPU is offline")
    if e.errno in (errno.ENOENT, errno.ENODEV):
        return AgentError(Status.NO_DEVICE, f"{path} does not exist: the {module} module is not loaded "
                                            f"(modprobe {module})")
    if e.errno in (errno.EACCES, errno.EPERM):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return AgentError(Status.NOT_ROOT, f"{path}: {os.strerror(e.errno)} as {who}: the agent must run as root "
                                           "with CAP_SYS_RAWIO")
    return AgentError(Status.FAILED, f"{path}: {os.strerror(e.errno or 0)}")


def open_device(path: str, flags: int, module: str) -> int:
    """A /dev/cpu/N device opened for the agent: a character device (or a regular file standing in for one in
    tests), never a FIFO or anything else that could block; each errno as the failure an operator can act on."""
    try:
        return open_checked(path, f"the {module} device", flags, device=True)
    except FileError as e:
        if e.errno is None:
            raise AgentError(Status.FAILED, str(e)) from None
        raise open_error(path, OSError(e.errno, os.strerror(e.errno)), module) from None


def kernel_file(path: str | Path) -> str | None:
    """A /sys or /proc file's text (at most KERNEL_FILE_CAP bytes; bytes that are not UTF-8 replaced), None where
    the system cannot read it (absent, not permitted), AgentError where it is not a regular file or too large."""
    try:
        return read_bytes(path, "kernel file", KERNEL_FILE_CAP).decode("utf-8", "replace")
    except FileError as e:
        if e.errno is None:
            raise AgentError(Status.FAILED, str(e)) from None
        return None


def lockdown_state(path: Path = LOCKDOWN) -> str | None:
    """The active lockdown mode ('integrity', 'confidentiality'), 'none', or None where it cannot be read
    (securityfs not mounted, or a kernel without the lockdown LSM)."""
    text = kernel_file(path)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def write_refusal(lockdown: str | None, allow_writes: str | None) -> AgentError:
    """Why a root write got EPERM, from what the kernel says about lockdown and the msr driver."""
    if lockdown not in (None, "none"):
        return AgentError(Status.LOCKDOWN, f"the kernel is locked down ({lockdown}; {LOCKDOWN}): it refuses MSR "
                                           "writes from user space; the hypervisor cannot be told")
    if allow_writes == "off":
        return AgentError(Status.LOCKDOWN, f"msr.allow_writes=off ({MSR_ALLOW_WRITES}): the msr driver refuses "
                                           "writes; boot with msr.allow_writes=on or write 'on' there")
    return AgentError(Status.LOCKDOWN, "the kernel refused the MSR write (EPERM): lockdown state "
                                       f"{lockdown or 'unreadable'}, msr.allow_writes={allow_writes or 'unreadable'}")


def write_faulted(cpu: int, index: int, value: int) -> AgentError:
    return AgentError(Status.WRITE_REFUSED, f"CPU {cpu} refused WRMSR {index:#x} <- {value:#x} (#GP): the "
                                            "hypervisor does not accept that value there")


def read_param(path: Path) -> str | None:
    text = kernel_file(path)
    return None if text is None else text.strip()


class MsrDevices:
    """RDMSR/WRMSR on a given CPU through /dev/cpu/N/msr (8 bytes at offset = MSR index)."""

    def __init__(self, root: str = "/dev/cpu") -> None:
        self.root = root
        self._fds: dict[tuple[int, bool], int] = {}

    def _fd(self, cpu: int, write: bool) -> int:
        key = (cpu, write)
        if key not in self._fds:
            path = f"{self.root}/{cpu}/msr"
            self._fds[key] = open_device(path, os.O_RDWR if write else os.O_RDONLY, "msr")
        return self._fds[key]

    def read(self, cpu: int, index: int) -> int | None:
        """The MSR's value, or None where RDMSR faulted (EIO: the MSR does not exist for this guest)."""
        try:
            data = os.pread(self._fd(cpu, False), 8, index)
        except OSError as e:
            if e.errno == errno.EIO:
                return None
            raise AgentError(Status.FAILED, f"RDMSR {index:#x} on CPU {cpu}: {os.strerror(e.errno or 0)}") from None
        if len(data) != 8:
            raise AgentError(Status.FAILED, f"RDMSR {index:#x} on CPU {cpu}: short read")
        value: int = struct.unpack("<Q", data)[0]
        return value

    def write(self, cpu: int, index: int, value: int) -> None:
        """WRMSR; EIO means the CPU raised #GP, EPERM that the kernel refuses writes."""
        try:
            os.pwrite(self._fd(cpu, True), struct.pack("<Q", value), index)
        except AgentError:
            raise
        except OSError as e:
            if e.errno == errno.EIO:
                raise write_faulted(cpu, index, value) from None
            if e.errno == errno.EPERM:
                raise write_refusal(lockdown_state(), read_param(MSR_ALLOW_WRITES)) from None
            raise AgentError(Status.FAILED, f"WRMSR {index:#x} on CPU {cpu}: {os.strerror(e.errno or 0)}") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def online_cpus(path: Path = Path("/sys/devices/system/cpu/online")) -> list[int]:
    """The online CPUs, from the kernel's range list ('0-3,5')."""
    try:
        text = read_bytes(path, "kernel file", KERNEL_FILE_CAP).decode("utf-8", "replace")
    except FileError as e:
        raise AgentError(Status.FAILED, str(e)) from None
    return parse_cpu_list(text)


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,5' -> [0, 1, 2, 3, 5]; AgentError for anything else (the kernel never writes it)."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            first, last = 0, -1
        if not 0 <= first <= last < 1 << 16:
            raise AgentError(Status.FAILED, f"the online CPU list {text.strip()[:80]!r} is not a list of CPU ranges")
        cpus.extend(range(first, last + 1))
    if not cpus:
        raise AgentError(Status.FAILED, "no CPU is online, says /sys/devices/system/cpu/online")
    return cpus
