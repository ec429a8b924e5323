"""The VM handle: guest memory slots backed by mmap, capabilities, the MSR filter, vCPU creation, dirty logs."""

from __future__ import annotations

import ctypes as C
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pvmit.kvm import abi
from pvmit.kvm.handle import FdHandle
from pvmit.kvm.system import Kvm, ioctl

if TYPE_CHECKING:
    from pvmit.kvm.vcpu import Vcpu

PAGE = 4096


class GuestMemory:
    """Anonymous memory that backs one guest-physical range. `view` is a writable memoryview over all of it."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest memory size {size:#x} must be a positive multiple of {PAGE:#x}")
        self.size = size
        self.mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mmap)
        self.address = C.addressof(C.c_char.from_buffer(self.mmap))

    def write(self, gpa_offset: int, data: bytes) -> None:
        if gpa_offset < 0 or gpa_offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {gpa_offset:#x} is outside guest memory ({self.size:#x})")
        self.view[gpa_offset:gpa_offset + len(data)] = data

    def read(self, gpa_offset: int, length: int) -> bytes:
        if gpa_offset < 0 or gpa_offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {gpa_offset:#x} is outside guest memory ({self.size:#x})")
        return bytes(self.view[gpa_offset:gpa_offset + length])


@dataclass(frozen=True)
class MsrRange:
    """MSRs [base, base+count) whose reads and/or writes leave KVM for userspace (KVM_MSR_FILTER, deny = exit)."""

    base: int
    count: int = 1
    read: bool = True
    write: bool = True


class Vm(FdHandle):
    """One KVM VM. Owns its fd; close it (or use `with`) when done. vCPUs are separate handles."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm_fd()
        self.memory: dict[int, tuple[int, GuestMemory, int]] = {}  # slot -> (gpa, memory, flags)
        self._filter_keepalive: list[object] = []

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        req = abi.KvmEnableCap()
        req.cap, req.flags = cap, flags
        for i, a in enumerate(args):
            req.args[i] = a
        ioctl(self.fd, abi.KVM_ENABLE_CAP, req)

    def set_tss_addr(self, gpa: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, gpa)

    def add_memory(self, slot: int, gpa: int, memory: GuestMemory, *, log_dirty: bool = False) -> None:
        """Map `memory` at guest-physical `gpa` (KVM_SET_USER_MEMORY_REGION)."""
        flags = abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        region = abi.KvmUserspaceMemoryRegion(slot, flags, gpa, memory.size, memory.address)
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self.memory[slot] = (gpa, memory, flags)

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        gpa, memory, _ = self.memory[slot]
        self.add_memory(slot, gpa, memory, log_dirty=enabled)

    def dirty_pages(self, slot: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: page numbers (within the slot) written since the last call; clears the log."""
        _, memory, flags = self.memory[slot]
        if not flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"slot {slot} does not log dirty pages")
        pages = memory.size // PAGE
        bitmap = (C.c_uint64 * ((pages + 63) // 64))()
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, abi.KvmDirtyLog(slot, 0, C.addressof(bitmap)))
        out = []
        for word_index, word in enumerate(bitmap):
            while word:
                low = word & -word
                out.append(word_index * 64 + low.bit_length() - 1)
                word ^= low
        return out

    def set_msr_filter(self, ranges: list[MsrRange], *, default_deny: bool = False) -> None:
        """Install the MSR filter: accesses to `ranges` exit to userspace (with KVM_MSR_EXIT_REASON_FILTER enabled);
        everything else is handled by KVM as usual. Replaces any previous filter."""
        if len(ranges) > abi.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {abi.KVM_MSR_FILTER_MAX_RANGES} MSR ranges, got {len(ranges)}")
        flt = abi.KvmMsrFilter()
        flt.flags = abi.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else abi.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep: list[object] = []
        for i, r in enumerate(ranges):
            bitmap = (C.c_uint8 * ((r.count + 7) // 8))()  # all zero: deny, i.e. exit to userspace
            keep.append(bitmap)
            rng = flt.ranges[i]
            rng.flags = (abi.KVM_MSR_FILTER_READ if r.read else 0) | (abi.KVM_MSR_FILTER_WRITE if r.write else 0)
            rng.nmsrs, rng.base, rng.bitmap = r.count, r.base, C.addressof(bitmap)
        ioctl(self.fd, abi.KVM_X86_SET_MSR_FILTER, flt)
        self._filter_keepalive = keep  # KVM copies the bitmaps, but keep them until the next call regardless

    def create_vcpu(self, index: int = 0) -> Vcpu:
        from pvmit.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, index)
        return Vcpu(fd, index, self.kvm.vcpu_mmap_size())
