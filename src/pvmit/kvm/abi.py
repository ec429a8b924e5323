"""The KVM userspace ABI on x86-64: ioctl numbers, capability numbers and structures, each declared once.

Everything here mirrors include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h; tests compare the sizes and
ioctl numbers with the kernel headers where a C compiler and the headers are installed.
"""

from __future__ import annotations

import ctypes as C
import struct

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) ---------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


KVMIO = 0xAE
KVM_API_VERSION = 12  # the only version the API has had since 2.6.22


# --- structures --------------------------------------------------------------------------------------------------
class KvmRegs(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16), ("type", C.c_uint8),
        ("present", C.c_uint8), ("dpl", C.c_uint8), ("db", C.c_uint8), ("s", C.c_uint8), ("l", C.c_uint8),
        ("g", C.c_uint8), ("avl", C.c_uint8), ("unusable", C.c_uint8), ("padding", C.c_uint8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(C.Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment), ("gs", KvmSegment),
        ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64), ("cr4", C.c_uint64), ("cr8", C.c_uint64),
        ("efer", C.c_uint64), ("apic_base", C.c_uint64),
        ("interrupt_bitmap", C.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(C.Structure):
    _fields_ = [
        ("fpr", (C.c_uint8 * 16) * 8), ("fcw", C.c_uint16), ("fsw", C.c_uint16), ("ftwx", C.c_uint8),
        ("pad1", C.c_uint8), ("last_opcode", C.c_uint16), ("last_ip", C.c_uint64), ("last_dp", C.c_uint64),
        ("xmm", (C.c_uint8 * 16) * 16), ("mxcsr", C.c_uint32), ("pad2", C.c_uint32),
    ]


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32), ("eax", C.c_uint32),
        ("ebx", C.c_uint32), ("ecx", C.c_uint32), ("edx", C.c_uint32), ("padding", C.c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # (sic) the kernel's spelling


class KvmCpuid2Header(C.Structure):
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


def kvm_cpuid2(n: int) -> type[C.Structure]:
    """struct kvm_cpuid2 with room for n entries (a flexible array member in C)."""

    class KvmCpuid2(C.Structure):
        _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32), ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class KvmMsrsHeader(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


def kvm_msrs(n: int) -> type[C.Structure]:
    """struct kvm_msrs with room for n entries."""

    class KvmMsrs(C.Structure):
        _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32), ("entries", KvmMsrEntry * n)]

    return KvmMsrs


class KvmMsrListHeader(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32)]


def kvm_msr_list(n: int) -> type[C.Structure]:
    class KvmMsrList(C.Structure):
        _fields_ = [("nmsrs", C.c_uint32), ("indices", C.c_uint32 * n)]

    return KvmMsrList


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
        ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmDirtyLog(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("padding1", C.c_uint32), ("dirty_bitmap", C.c_uint64)]


class KvmEnableCap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4), ("pad", C.c_uint8 * 64)]


KVM_MSR_FILTER_MAX_RANGES = 16


class KvmMsrFilterRange(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("nmsrs", C.c_uint32), ("base", C.c_uint32), ("bitmap", C.c_void_p)]


class KvmMsrFilter(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES)]


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2


class KvmVcpuEvents(C.Structure):
    """struct kvm_vcpu_events: pending exceptions/interrupts/NMI; carried across migration."""

    _fields_ = [
        ("exception_injected", C.c_uint8), ("exception_nr", C.c_uint8), ("exception_has_error_code", C.c_uint8),
        ("exception_pending", C.c_uint8), ("exception_error_code", C.c_uint32),
        ("interrupt_injected", C.c_uint8), ("interrupt_nr", C.c_uint8), ("interrupt_soft", C.c_uint8),
        ("interrupt_shadow", C.c_uint8),
        ("nmi_injected", C.c_uint8), ("nmi_pending", C.c_uint8), ("nmi_masked", C.c_uint8), ("nmi_pad", C.c_uint8),
        ("sipi_vector", C.c_uint32), ("flags", C.c_uint32),
        ("smi_smm", C.c_uint8), ("smi_pending", C.c_uint8), ("smi_inside_nmi", C.c_uint8),
        ("smi_latched_init", C.c_uint8),
        ("reserved", C.c_uint8 * 27), ("exception_has_payload", C.c_uint8), ("exception_payload", C.c_uint64),
    ]


class KvmXsave(C.Structure):
    """struct kvm_xsave: the legacy 4096-byte XSAVE area (AVX state, XCR0-governed components)."""

    _fields_ = [("region", C.c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class KvmXcr(C.Structure):
    _fields_ = [("xcr", C.c_uint32), ("reserved", C.c_uint32), ("value", C.c_uint64)]


class KvmXcrs(C.Structure):
    _fields_ = [("nr_xcrs", C.c_uint32), ("flags", C.c_uint32), ("xcrs", KvmXcr * KVM_MAX_XCRS),
                ("padding", C.c_uint64 * 16)]


class KvmDebugregs(C.Structure):
    _fields_ = [("db", C.c_uint64 * 4), ("dr6", C.c_uint64), ("dr7", C.c_uint64), ("flags", C.c_uint64),
                ("reserved", C.c_uint64 * 9)]


class KvmMpState(C.Structure):
    _fields_ = [("mp_state", C.c_uint32)]


# --- ioctls ------------------------------------------------------------------------------------------------------
# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, C.sizeof(KvmMsrListHeader))
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, C.sizeof(KvmCpuid2Header))
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, C.sizeof(KvmMsrListHeader))
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, C.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, C.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_ENABLE_CAP = _iow(0xA3, C.sizeof(KvmEnableCap))
KVM_X86_SET_MSR_FILTER = _iow(0xC6, C.sizeof(KvmMsrFilter))
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, C.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, C.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, C.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, C.sizeof(KvmSregs))
KVM_GET_MSRS = _iowr(0x88, C.sizeof(KvmMsrsHeader))  # also on /dev/kvm, for feature MSRs
KVM_SET_MSRS = _iow(0x89, C.sizeof(KvmMsrsHeader))
KVM_GET_FPU = _ior(0x8C, C.sizeof(KvmFpu))
KVM_SET_FPU = _iow(0x8D, C.sizeof(KvmFpu))
KVM_SET_CPUID2 = _iow(0x90, C.sizeof(KvmCpuid2Header))
KVM_GET_CPUID2 = _iowr(0x91, C.sizeof(KvmCpuid2Header))
KVM_GET_MP_STATE = _ior(0x98, C.sizeof(KvmMpState))
KVM_SET_MP_STATE = _iow(0x99, C.sizeof(KvmMpState))
KVM_GET_DEBUGREGS = _ior(0xA1, C.sizeof(KvmDebugregs))
KVM_SET_DEBUGREGS = _iow(0xA2, C.sizeof(KvmDebugregs))
KVM_GET_XSAVE = _ior(0xA4, C.sizeof(KvmXsave))
KVM_SET_XSAVE = _iow(0xA5, C.sizeof(KvmXsave))
KVM_GET_XCRS = _ior(0xA6, C.sizeof(KvmXcrs))
KVM_SET_XCRS = _iow(0xA7, C.sizeof(KvmXcrs))
KVM_GET_VCPU_EVENTS = _ior(0x9F, C.sizeof(KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, C.sizeof(KvmVcpuEvents))

IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in reversed(dict(globals()).items())
    if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == KVMIO
}
"""Number -> name, for error messages."""

# --- capabilities (include/uapi/linux/kvm.h) --------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_DIRTY_LOG_RING = 192
CAPABILITIES: dict[str, int] = {k: v for k, v in dict(globals()).items() if k.startswith("KVM_CAP_")}
"""The capabilities pvmit asks about, by name."""

# --- exit reasons ------------------------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
EXIT_NAMES: dict[int, str] = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# --- struct kvm_run field offsets (read through a memoryview of the mmap; no object per exit) -------------------
RUN_EXIT_REASON = struct.Struct("<I")  # at 8
RUN_EXIT_REASON_OFFSET = 8
RUN_IMMEDIATE_EXIT_OFFSET = 1
RUN_UNION_OFFSET = 32
RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
RUN_MSR = struct.Struct("<B7xIIQ")  # error, (pad), reason, index, data
RUN_MSR_ERROR_OFFSET = RUN_UNION_OFFSET
RUN_MSR_DATA_OFFSET = RUN_UNION_OFFSET + 16
RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
RUN_FAIL_ENTRY = struct.Struct("<QI")
RUN_INTERNAL = struct.Struct("<II")  # suberror, ndata
RUN_SYSTEM_EVENT = struct.Struct("<II")  # type, ndata (flags in older kernels)
