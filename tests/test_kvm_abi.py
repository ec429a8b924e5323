"""The KVM ABI declarations against the kernel's own headers, compiled with the system C compiler."""

from __future__ import annotations

import ctypes as C
import shutil
import subprocess
from pathlib import Path

import pytest

from pvmit.kvm import abi

HEADER = Path("/usr/include/linux/kvm.h")
STRUCTS = {
    "kvm_regs": abi.KvmRegs, "kvm_sregs": abi.KvmSregs, "kvm_fpu": abi.KvmFpu, "kvm_segment": abi.KvmSegment,
    "kvm_cpuid_entry2": abi.KvmCpuidEntry2, "kvm_msr_entry": abi.KvmMsrEntry,
    "kvm_userspace_memory_region": abi.KvmUserspaceMemoryRegion, "kvm_enable_cap": abi.KvmEnableCap,
    "kvm_msr_filter": abi.KvmMsrFilter, "kvm_msr_filter_range": abi.KvmMsrFilterRange,
    "kvm_vcpu_events": abi.KvmVcpuEvents, "kvm_dirty_log": abi.KvmDirtyLog, "kvm_xsave": abi.KvmXsave,
    "kvm_xcrs": abi.KvmXcrs, "kvm_debugregs": abi.KvmDebugregs, "kvm_mp_state": abi.KvmMpState,
}
IOCTLS = [n for n in sorted(set(abi.IOCTL_NAMES.values()))]
CONSTS = sorted(abi.CAPABILITIES) + sorted(abi.EXIT_NAMES.values()) + [
    "KVM_MSR_EXIT_REASON_FILTER", "KVM_MSR_FILTER_DEFAULT_DENY", "KVM_MEM_LOG_DIRTY_PAGES"]


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and the kernel headers (linux-libc-dev) to compare with")
    d = tmp_path_factory.mktemp("abi")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    lines += [f'printf("sizeof {n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS]
    lines += [f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in IOCTLS + CONSTS]
    lines += ['printf("offsetof msr %zu\\n", offsetof(struct kvm_run, msr));',
              'printf("offsetof s %zu\\n", offsetof(struct kvm_run, s));',
              'printf("offsetof exit_reason %zu\\n", offsetof(struct kvm_run, exit_reason));',
              'return 0; }']
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], check=True, capture_output=True)
    outp = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in outp.splitlines())}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_sizes_match_the_kernel(kernel_abi: dict[str, int], name: str) -> None:
    assert C.sizeof(STRUCTS[name]) == kernel_abi[f"sizeof {name}"]


@pytest.mark.parametrize("name", IOCTLS + CONSTS)
def test_numbers_match_the_kernel(kernel_abi: dict[str, int], name: str) -> None:
    assert getattr(abi, name) == kernel_abi[name]


def test_kvm_run_offsets(kernel_abi: dict[str, int]) -> None:
    assert kernel_abi["offsetof msr"] == abi.RUN_UNION_OFFSET
    assert kernel_abi["offsetof exit_reason"] == abi.RUN_EXIT_REASON_OFFSET
