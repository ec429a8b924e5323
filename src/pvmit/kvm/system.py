"""The system handle: /dev/kvm itself (API version, capabilities, supported CPUID, feature MSRs)."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from typing import Any

from pvmit.kvm import abi
from pvmit.kvm.errors import KvmError, KvmUnavailable
from pvmit.kvm.handle import FdHandle

KVM_DEVICE = "/dev/kvm"


def ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """fcntl.ioctl that raises KvmError naming the ioctl and errno. `arg` may be an int or a ctypes object."""
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as e:
        raise KvmError(abi.IOCTL_NAMES.get(request, f"ioctl {request:#x}"), e.errno or 0) from None


def get_msrs(fd: int, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS on a system or vCPU fd. KVM stops at the first MSR it does not know: those from there on are
    left out of the answer."""
    buf = abi.kvm_msrs(len(indices))()
    buf.nmsrs = len(indices)
    for i, idx in enumerate(indices):
        buf.entries[i].index = idx
    n = ioctl(fd, abi.KVM_GET_MSRS, buf)
    return {buf.entries[i].index: buf.entries[i].data for i in range(n)}


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def out(self, reg: str) -> int:
        return int(getattr(self, reg))


class Kvm(FdHandle):
    """An open /dev/kvm. Close it (or use `with`) when done."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist (no KVM in this kernel, or not exposed here)") from None
        except PermissionError:
            raise KvmUnavailable(f"{path}: permission denied (run as root or join the 'kvm' group)") from None
        except OSError as e:
            raise KvmUnavailable(f"{path}: cannot open: {os.strerror(e.errno or 0)}") from None
        version = self.api_version()
        if version != abi.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path}: KVM API version {version}, pvmit needs {abi.KVM_API_VERSION}")

    def api_version(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """0 when the capability is absent, else its value (often 1, sometimes a count or bitmask)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(num) for name, num in abi.CAPABILITIES.items()}

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what KVM can show a guest on this host. Grows the buffer on E2BIG."""
        while True:
            buf = abi.kvm_cpuid2(max_entries)()
            buf.nent = max_entries
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[: buf.nent]
            ]

    def _msr_list(self, request: int) -> list[int]:
        probe = abi.kvm_msr_list(0)()
        try:
            ioctl(self.fd, request, probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        buf = abi.kvm_msr_list(n)()
        buf.nmsrs = n
        ioctl(self.fd, request, buf)
        return list(buf.indices[: buf.nmsrs])

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs that are saved and restored with a vCPU."""
        return self._msr_list(abi.KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs whose host-supported value KVM reports."""
        return self._msr_list(abi.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def feature_msrs(self, indices: list[int]) -> dict[int, int]:
        """System-level KVM_GET_MSRS: the value of each feature MSR KVM would offer a guest."""
        return get_msrs(self.fd, indices)

    def create_vm_fd(self) -> int:
        """KVM_CREATE_VM; the VM handle (`pvmit.kvm.vm.Vm`) wraps the returned fd."""
        return ioctl(self.fd, abi.KVM_CREATE_VM, 0)


def kvm_available(path: str = KVM_DEVICE) -> tuple[bool, str]:
    """(usable, reason): whether pvmit can open and use /dev/kvm here, and if not, why."""
    try:
        with Kvm(path) as kvm:
            missing = [
                name for name, cap in (("KVM_CAP_X86_USER_SPACE_MSR", abi.KVM_CAP_X86_USER_SPACE_MSR),
                                       ("KVM_CAP_X86_MSR_FILTER", abi.KVM_CAP_X86_MSR_FILTER))
                if not kvm.check_extension(cap)
            ]
    except KvmUnavailable as e:
        return False, str(e)
    if missing:
        return False, f"{path} lacks {', '.join(missing)}"
    return True, f"{path} usable (API {abi.KVM_API_VERSION})"


__all__ = ["KVM_DEVICE", "CpuidEntry", "Kvm", "ioctl", "kvm_available"]
