"""A minimal 64-bit machine on KVM: memory, identity-mapped page tables, a GDT, one long-mode vCPU.

Layout of guest-physical memory (all identity-mapped with 2 MiB pages):
  0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 GDT (null, 64-bit code 0x08, data 0x10),
  0x10000 the guest program (`pvmit.guest.LOAD_ADDRESS`), the stack grows down from the top of memory.
"""

from __future__ import annotations

import struct

from pvmit.errors import InputError
from pvmit.kvm import abi
from pvmit.kvm.system import Kvm
from pvmit.kvm.vcpu import Regs, Vcpu
from pvmit.kvm.vm import GuestMemory, Vm

PML4, PDPT, PD, GDT = 0x1000, 0x2000, 0x3000, 0x4000
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
GDT_ENTRIES = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)  # null; code: L=1 P=1 S=1 exec/read; data: rw
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
MIN_MEMORY = 2 << 20
MAX_MEMORY = 1 << 30  # one page directory of 2 MiB pages


def write_page_tables(mem: GuestMemory) -> None:
    """Identity-map all of `mem` with 2 MiB pages (up to 1 GiB, one PD)."""
    pages = (mem.size + (2 << 20) - 1) >> 21
    if pages > 512:
        raise ValueError("the minimal machine maps at most 1 GiB")
    mem.write(PML4, struct.pack("<Q", PDPT | 3))
    mem.write(PDPT, struct.pack("<Q", PD | 3))
    mem.write(PD, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(pages)))  # present, rw, 2 MiB
    mem.write(GDT, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))


def _segment(selector: int, type_: int, long_mode: bool) -> abi.KvmSegment:
    s = abi.KvmSegment()
    s.base, s.limit, s.selector, s.type = 0, 0xFFFFFFFF, selector, type_
    s.present, s.dpl, s.s, s.g = 1, 0, 1, 1
    s.l, s.db = (1, 0) if long_mode else (0, 1)
    return s


def enter_long_mode(vcpu: Vcpu, entry: int, stack_top: int, args: tuple[int, ...] = ()) -> None:
    """Put `vcpu` in 64-bit mode at `entry` with paging on, rsp = stack_top and rdi, rsi, rdx, rcx, r8, r9 = args
    (the System V argument registers, as many as given)."""
    s = vcpu.get_sregs()
    s.cs = _segment(CODE_SELECTOR, 11, True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, _segment(DATA_SELECTOR, 3, False))
    s.gdt.base, s.gdt.limit = GDT, 8 * len(GDT_ENTRIES) - 1
    s.cr3, s.cr4 = PML4, CR4_PAE
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(s)
    regs = Regs(rip=entry, rsp=stack_top, rflags=2)
    for name, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9")[: len(args)], args, strict=True):
        setattr(regs, name, value)
    vcpu.set_regs(regs)


class Machine:
    """A VM with one memory slot at guest-physical 0 and one vCPU, ready for a 64-bit program."""

    def __init__(self, kvm: Kvm, memory_size: int = 4 << 20, *, log_dirty: bool = False) -> None:
        if not MIN_MEMORY <= memory_size <= MAX_MEMORY or memory_size % (2 << 20):
            raise InputError(f"guest memory of {memory_size} bytes: this machine takes a multiple of 2 MiB from "
                             f"{MIN_MEMORY >> 20} MiB to {MAX_MEMORY >> 30} GiB")
        self.kvm = kvm
        self.vm = Vm(kvm)
        self.memory = GuestMemory(memory_size)
        self.vm.add_memory(0, 0, self.memory, log_dirty=log_dirty)
        write_page_tables(self.memory)
        self.vcpu = self.vm.create_vcpu(0)

    @property
    def stack_top(self) -> int:
        return self.memory.size - 0x1000

    def load(self, code: bytes, address: int) -> None:
        if address < GDT + 0x1000:
            raise ValueError(f"programs load at or above {GDT + 0x1000:#x}")
        self.memory.write(address, code)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.memory.close()
