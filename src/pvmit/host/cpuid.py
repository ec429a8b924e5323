"""Executing CPUID on this machine for real.

Two ways: the CPUID instruction itself, run from a small stub assembled from host/cpuid_stub.s into an executable
mapping, or the kernel's /dev/cpu/N/cpuid (which runs CPUID on CPU N). The first needs nothing but may be refused
where writable+executable memory is forbidden; the second needs the cpuid module.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable
from typing import Protocol

from pvmit.asm import assemble, package_source
from pvmit.userfiles import FileError, open_checked

Regs = tuple[int, int, int, int]


class CpuidSource(Protocol):
    method: str

    def __call__(self, leaf: int, subleaf: int = 0) -> Regs: ...


class InstructionCpuid:
    """CPUID run in this process from an assembled stub (on whatever CPU the process is on)."""

    method = "cpuid instruction"

    def __init__(self) -> None:
        code = assemble(package_source("pvmit.host", "cpuid_stub.s"), name="cpuid_stub.s")
        self._mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._mem.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))
        self._fn: Callable[..., None] = proto(addr)
        self._out = (ctypes.c_uint32 * 4)()

    def __call__(self, leaf: int, subleaf: int = 0) -> Regs:
        self._fn(leaf, subleaf, ctypes.byref(self._out))
        a, b, c, d = self._out
        return a, b, c, d


class DevCpuid:
    """CPUID through /dev/cpu/N/cpuid: pread of 16 bytes at offset leaf | subleaf << 32."""

    def __init__(self, cpu: int = 0) -> None:
        self.path = f"/dev/cpu/{cpu}/cpuid"
        self.method = self.path
        try:
            self._fd = open_checked(self.path, "the cpuid device", device=True)
        except FileError as e:
            raise OSError(e.errno or errno.EINVAL, str(e)) from None

    def __call__(self, leaf: int, subleaf: int = 0) -> Regs:
        a, b, c, d = struct.unpack("<4I", os.pread(self._fd, 16, leaf | (subleaf << 32)))
        return a, b, c, d


def open_cpuid() -> tuple[CpuidSource | None, list[str]]:
    """The first CPUID method that works here, and why the others did not."""
    problems: list[str] = []
    try:
        return InstructionCpuid(), problems
    except Exception as e:  # noqa: BLE001 - any failure means: try the next method, and report why
        problems.append(f"cpuid instruction stub: {e}")
    try:
        dev = DevCpuid(0)
        dev(0)  # a device that opens but cannot be read is no better than none
        return dev, problems
    except OSError as e:
        problems.append(f"/dev/cpu/0/cpuid: {os.strerror(e.errno or 0)}")
    return None, problems


def vendor_string(cpuid: CpuidSource) -> str:
    _, b, c, d = cpuid(0)
    return struct.pack("<3I", b, d, c).decode("ascii", "replace")


def family_model_stepping(eax: int) -> tuple[int, int, int]:
    """Decode CPUID.1.EAX the way the SDM (and Linux x86_family/x86_model) do."""
    family = (eax >> 8) & 0xF
    model = (eax >> 4) & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    if family >= 6:
        model |= ((eax >> 16) & 0xF) << 4
    return family, model, eax & 0xF


def brand_string(cpuid: CpuidSource) -> str:
    if cpuid(0x80000000)[0] < 0x80000004:
        return ""
    raw = b"".join(struct.pack("<4I", *cpuid(leaf)) for leaf in (0x80000002, 0x80000003, 0x80000004))
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def hypervisor_signature(cpuid: CpuidSource) -> tuple[int, str] | None:
    """(max leaf, signature) at 0x40000000 when CPUID.1.ECX[31] says a hypervisor is present."""
    if not cpuid(1)[2] & (1 << 31):
        return None
    a, b, c, d = cpuid(0x40000000)
    return a, struct.pack("<3I", b, c, d).decode("ascii", "replace").rstrip("\0")
