"""Executing CPUID in the guest: through the cpuid driver (/dev/cpu/0/cpuid), or where that module is not
loaded, with the CPUID instruction itself from a 31-byte stub in an executable mapping.

The stub is the machine code of src/pvmit/host/cpuid_stub.s (tests/test_agent.py assembles that file and checks
these bytes), System V AMD64: void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]).

    53            push rbx              ; CPUID writes rbx, which is callee-saved
    49 89 d0      mov  r8, rdx          ; out
    89 f8         mov  eax, edi         ; leaf
    89 f1         mov  ecx, esi         ; subleaf
    0f a2         cpuid
    41 89 00      mov  [r8], eax
    41 89 58 04   mov  [r8+4], ebx
    41 89 48 08   mov  [r8+8], ecx
    41 89 50 0c   mov  [r8+12], edx
    5b            pop  rbx
    c3            ret
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

from pvmit.agent.errors import AgentError, Status
from pvmit.agent.msrdev import open_device

CPUID_STUB = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")


class DevCpuid:
    """CPUID on CPU 0 through /dev/cpu/0/cpuid: 16 bytes at offset leaf | subleaf << 32."""

    def __init__(self, root: str = "/dev/cpu") -> None:
        self.method = f"{root}/0/cpuid"
        self._fd = open_device(self.method, os.O_RDONLY, "cpuid")

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        a, b, c, d = struct.unpack("<4I", os.pread(self._fd, 16, leaf | (subleaf << 32)))
        return a, b, c, d


class InstructionCpuid:
    """CPUID run in this process (on whichever CPU it is on; the leaves the agent reads are the same on all)."""

    method = "CPUID instruction (stub)"

    def __init__(self) -> None:
        import ctypes  # not in every small guest's Python; only needed here

        self._mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._mem.write(CPUID_STUB)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))
        self._fn: Callable[..., None] = proto(addr)
        self._out: Any = (ctypes.c_uint32 * 4)()
        self._ref = ctypes.byref(self._out)

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        self._fn(leaf, subleaf, self._ref)
        a, b, c, d = self._out
        return a, b, c, d


def open_cpuid(root: str = "/dev/cpu") -> DevCpuid | InstructionCpuid:
    """The cpuid driver, else the instruction; NO_DEVICE naming both problems where neither works."""
    try:
        return DevCpuid(root)
    except AgentError as e:
        if e.status is not Status.NO_DEVICE:
            raise
        first = str(e)
    try:
        return InstructionCpuid()
    except (ImportError, OSError, ValueError) as e:
        raise AgentError(Status.NO_DEVICE, f"{first}; and the CPUID instruction stub cannot run here ({e})") from None
