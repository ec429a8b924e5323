"""The vCPU handle: registers, CPUID, MSRs, events, and `run()` returning a typed exit.

`run()` allocates nothing per exit: each exit kind is one preallocated object per vCPU whose fields are refreshed
from the shared kvm_run page through ctypes views made once. A caller must not keep an exit object across runs.
"""

from __future__ import annotations

import ctypes as C
import fcntl
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

from pvmit.kvm import abi
from pvmit.kvm.errors import KvmError
from pvmit.kvm.handle import FdHandle
from pvmit.kvm.system import CpuidEntry, get_msrs, ioctl

REG_NAMES: tuple[str, ...] = tuple(f[0] for f in abi.KvmRegs._fields_)


class Exit:
    """Base of the typed exits; `reason` is the KVM_EXIT_* number."""

    reason: int = -1
    __slots__ = ()


class IoExit(Exit):
    """KVM_EXIT_IO: `port`, `size`, `count`, `out`; `data` is a view of the bytes (write to it for an IN)."""

    __slots__ = ("port", "size", "count", "out", "offset")
    reason = abi.KVM_EXIT_IO

    def __init__(self) -> None:
        self.port = self.size = self.count = self.offset = 0
        self.out = False


class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / WRMSR: answer with `Vcpu.complete_rdmsr(value)` or `complete_wrmsr()`, or `fault()`."""

    __slots__ = ("index", "data", "write", "filter_reason")

    def __init__(self, write: bool) -> None:
        self.index = self.data = self.filter_reason = 0
        self.write = write

    @property
    def reason(self) -> int:  # type: ignore[override]
        return abi.KVM_EXIT_X86_WRMSR if self.write else abi.KVM_EXIT_X86_RDMSR


class HltExit(Exit):
    __slots__ = ()
    reason = abi.KVM_EXIT_HLT


class ShutdownExit(Exit):
    """Triple fault or similar: the guest cannot continue."""

    __slots__ = ()
    reason = abi.KVM_EXIT_SHUTDOWN


class MmioExit(Exit):
    __slots__ = ("address", "length", "write")
    reason = abi.KVM_EXIT_MMIO

    def __init__(self) -> None:
        self.address = self.length = 0
        self.write = False


class IntrExit(Exit):
    """KVM_EXIT_INTR: KVM_RUN returned because of a signal or immediate_exit."""

    __slots__ = ()
    reason = abi.KVM_EXIT_INTR


class OtherExit(Exit):
    """Any other exit (FAIL_ENTRY, INTERNAL_ERROR, SYSTEM_EVENT, ...): `reason`, `name` and `detail` say what."""

    __slots__ = ("_reason", "name", "detail")

    def __init__(self) -> None:
        self._reason, self.name, self.detail = 0, "", ""

    @property
    def reason(self) -> int:  # type: ignore[override]
        return self._reason


@dataclass
class Regs:
    """General-purpose registers as a plain, copyable record (the ctypes struct stays inside the handle)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2


class Vcpu(FdHandle):
    """One vCPU of a VM."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self._run = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        run = self._run
        # Views into struct kvm_run, made once; reading .value allocates nothing beyond the int.
        self._exit_reason = C.c_uint32.from_buffer(run, abi.RUN_EXIT_REASON_OFFSET)
        self._immediate_exit = C.c_uint8.from_buffer(run, abi.RUN_IMMEDIATE_EXIT_OFFSET)
        u = abi.RUN_UNION_OFFSET
        self._io_direction = C.c_uint8.from_buffer(run, u)
        self._io_size = C.c_uint8.from_buffer(run, u + 1)
        self._io_port = C.c_uint16.from_buffer(run, u + 2)
        self._io_count = C.c_uint32.from_buffer(run, u + 4)
        self._io_offset = C.c_uint64.from_buffer(run, u + 8)
        self._msr_error = C.c_uint8.from_buffer(run, u)
        self._msr_reason = C.c_uint32.from_buffer(run, u + 8)
        self._msr_index = C.c_uint32.from_buffer(run, u + 12)
        self._msr_data = C.c_uint64.from_buffer(run, u + 16)
        self._mmio_addr = C.c_uint64.from_buffer(run, u)
        self._mmio_len = C.c_uint32.from_buffer(run, u + 16)
        self._mmio_write = C.c_uint8.from_buffer(run, u + 20)
        self._u32_a = C.c_uint32.from_buffer(run, u)
        self._u32_b = C.c_uint32.from_buffer(run, u + 4)
        self._u64_a = C.c_uint64.from_buffer(run, u)
        self.run_view = memoryview(run)
        self._io, self._rd, self._wr = IoExit(), MsrExit(False), MsrExit(True)
        self._hlt, self._shutdown, self._mmio, self._intr, self._other = (
            HltExit(), ShutdownExit(), MmioExit(), IntrExit(), OtherExit())
        self._regs = abi.KvmRegs()
        self._sregs = abi.KvmSregs()
        self._fd_run = fd
        self._ioctl = fcntl.ioctl
        self._kvm_run = abi.KVM_RUN

    def close(self) -> None:
        if self.fd >= 0:
            # ctypes views export the mmap's buffer; drop them before closing it
            for name in [n for n in vars(self) if n.startswith("_") and isinstance(getattr(self, n), C._SimpleCData)]:
                setattr(self, name, None)
            self.run_view.release()
            self._run.close()
            os.close(self.fd)
            self.fd = -1


    # --- running -----------------------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN once and return the exit (a reused object; read it before the next run)."""
        try:
            self._ioctl(self._fd_run, self._kvm_run, 0)
        except InterruptedError:
            return self._intr
        except OSError as e:
            raise KvmError("KVM_RUN", e.errno or 0) from None
        reason = self._exit_reason.value
        if reason == abi.KVM_EXIT_X86_RDMSR or reason == abi.KVM_EXIT_X86_WRMSR:
            x = self._wr if reason == abi.KVM_EXIT_X86_WRMSR else self._rd
            x.index = self._msr_index.value
            x.data = self._msr_data.value
            x.filter_reason = self._msr_reason.value
            return x
        if reason == abi.KVM_EXIT_IO:
            io = self._io
            io.port, io.size, io.count = self._io_port.value, self._io_size.value, self._io_count.value
            io.out, io.offset = self._io_direction.value == abi.KVM_EXIT_IO_OUT, self._io_offset.value
            return io
        if reason == abi.KVM_EXIT_HLT:
            return self._hlt
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return self._shutdown
        if reason == abi.KVM_EXIT_MMIO:
            m = self._mmio
            m.address, m.length, m.write = self._mmio_addr.value, self._mmio_len.value, bool(self._mmio_write.value)
            return m
        if reason == abi.KVM_EXIT_INTR:
            return self._intr
        o = self._other
        o._reason, o.name = reason, abi.EXIT_NAMES.get(reason, f"exit {reason}")
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            o.detail = f"hardware_entry_failure_reason={self._u64_a.value:#x}"
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            o.detail = f"suberror={self._u32_a.value} ndata={self._u32_b.value}"
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            o.detail = f"type={self._u32_a.value}"
        else:
            o.detail = ""
        return o

    def io_data(self, io: IoExit) -> memoryview:
        """The bytes of an I/O exit (size * count), inside the kvm_run page."""
        return self.run_view[io.offset:io.offset + io.size * io.count]

    def complete_rdmsr(self, value: int) -> None:
        self._msr_error.value = 0
        self._msr_data.value = value

    def complete_wrmsr(self) -> None:
        self._msr_error.value = 0

    def fault(self) -> None:
        """Inject #GP for the RDMSR/WRMSR that exited (run->msr.error = 1)."""
        self._msr_error.value = 1

    def request_exit(self, on: bool = True) -> None:
        """Set kvm_run.immediate_exit: the next KVM_RUN returns at once with KVM_EXIT_INTR."""
        self._immediate_exit.value = 1 if on else 0

    # --- state -------------------------------------------------------------------------------------------------
    def get_regs(self) -> Regs:
        ioctl(self.fd, abi.KVM_GET_REGS, self._regs)
        return Regs(*(getattr(self._regs, f) for f in REG_NAMES))

    def set_regs(self, regs: Regs) -> None:
        for f in REG_NAMES:
            setattr(self._regs, f, getattr(regs, f))
        ioctl(self.fd, abi.KVM_SET_REGS, self._regs)

    def get_sregs(self) -> abi.KvmSregs:
        s = abi.KvmSregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.KvmFpu:
        f = abi.KvmFpu()
        ioctl(self.fd, abi.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_events(self) -> abi.KvmVcpuEvents:
        e = abi.KvmVcpuEvents()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_events(self, events: abi.KvmVcpuEvents) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def get_state(self, struct: type[C.Structure], request: int) -> C.Structure:
        """One of the fixed-size state ioctls (XSAVE, XCRS, DEBUGREGS, MP_STATE, ...) into a fresh structure."""
        s = struct()
        ioctl(self.fd, request, s)
        return s

    def set_state(self, request: int, value: C.Structure) -> None:
        ioctl(self.fd, request, value)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        entries = list(entries)
        buf = abi.kvm_cpuid2(len(entries))()  # a bytearray-backed ctypes buffer: fcntl copies it in place
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            t = buf.entries[i]
            t.function, t.index, t.flags = e.function, e.index, e.flags
            t.eax, t.ebx, t.ecx, t.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def get_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID table KVM holds for this vCPU."""
        buf = abi.kvm_cpuid2(max_entries)()
        buf.nent = max_entries
        ioctl(self.fd, abi.KVM_GET_CPUID2, buf)
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf.entries[:buf.nent]]

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; an MSR KVM does not know stops the list there: those missing are left out."""
        return get_msrs(self.fd, list(indices))

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses)."""
        buf = abi.kvm_msrs(len(values))()
        buf.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index, buf.entries[i].data = idx, val
        return ioctl(self.fd, abi.KVM_SET_MSRS, buf)
