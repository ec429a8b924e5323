"""The VM handle: guest memory slots backed by mmap, capabilities, the MSR filter, vCPU creation, dirty logs."""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pvmit.kvm import abi
from pvmit.kvm.handle import FdHandle
from pvmit.kvm.system import Kvm, ioctl

if TYPE_CHECKING:
    from pvmit.kvm.vcpu import Vcpu

PAGE = 4096


class GuestMemory:
    """Memory that backs one guest-physical range: a memfd mapped shared. `view` is a writable memoryview over all
    of it.

    A memfd rather than anonymous memory because the kernel then tells which parts were ever written
    (`data_extents`, lseek SEEK_DATA/SEEK_HOLE): a migration reads only those, never faulting in the untouched rest,
    and the file can be handed to `os.sendfile`."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest memory size {size:#x} must be a positive multiple of {PAGE:#x}")
        self.size = size
        self.fd = os.memfd_create("pvmit-guest", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mmap = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
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

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) (page-aligned) read as zero by giving its pages back to the kernel
        (MADV_REMOVE on the memfd): nothing is written, nothing untouched is faulted in."""
        if offset % PAGE or length % PAGE or offset < 0 or offset + length > self.size:
            raise ValueError(f"zero({offset:#x}, {length:#x}) is not a page-aligned range of guest memory")
        if length:
            self.mmap.madvise(mmap.MADV_REMOVE, offset, length)

    def data_extents(self) -> list[tuple[int, int]]:
        """(start, end) byte ranges that were ever written; the rest reads as zero without being touched."""
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data beyond pos
                    break
                return [(0, self.size)]  # a file system without SEEK_DATA: everything may hold data
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            out.append((start, end))
            pos = end
        return out

    def nonzero_pages(self, extents: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Page numbers, ascending, of the pages within `extents` (default: every written extent) holding any
        non-zero byte. Only those extents are read."""
        found = []
        for start, end in self.data_extents() if extents is None else extents:
            first, last = start // PAGE, (end + PAGE - 1) // PAGE
            words = np.frombuffer(self.mmap, dtype=np.uint64, count=(last - first) * (PAGE // 8),
                                  offset=first * PAGE).reshape(-1, PAGE // 8)
            found.append(np.flatnonzero(words.any(axis=1)) + first)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        """Unmap and close the memfd (the memory goes when KVM and every view have let go of it)."""
        try:
            self.view.release()
            self.mmap.close()
        except BufferError:
            pass  # a slice of the view is still held somewhere; the mapping goes with the last one
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        """KVM_GET_DIRTY_LOG: page numbers (within the slot), ascending, written since the last call; clears the
        log."""
        _, memory, flags = self.memory[slot]
        if not flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"slot {slot} does not log dirty pages")
        pages = memory.size // PAGE
        bitmap = np.zeros((pages + 63) // 64, dtype=np.uint64)
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, abi.KvmDirtyLog(slot, 0, bitmap.ctypes.data))
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:pages]
        return [int(p) for p in np.flatnonzero(bits)]

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
