"""What KVM does to each speculation bit between the host and a guest: which bits a reading taken inside a KVM
guest reports as the hardware has them, which KVM may set on its own, and which it hides.

Real-hardware readings pvmit checks its catalog against (Firecracker's CPU fingerprints) are guest views through
KVM, so a bit of such a reading is evidence about the hardware only where KVM passes it through:
  PASS  the guest sees the host's bit: a 1 and a 0 both say what the hardware has;
  SETS  KVM may set the bit where the hardware does not (it synthesises "not affected" bits from the host's own
        bug status, or always sets it), but never clears a 1 the hardware has: only a 0 says what the hardware has;
  every other bit says nothing (KVM hides it, may clear it, or derives it from something else).

Sources (torvalds/linux): arch/x86/kvm/x86.c KVM_SUPPORTED_ARCH_CAP and kvm_get_arch_capabilities() (PSCHANGE_MC_NO
always; SKIP_VMENTRY_L1DFLUSH while L1D flushing is on; RDCL_NO, SSB_NO, MDS_NO, RFDS_NO, ITS_NO where the host is
not affected; GDS_NO also where microcode mitigates GDS; TAA_NO cleared when the host hides RTM); arch/x86/kvm/cpuid.c
kvm_set_cpu_caps() (CPUID_7_EDX, CPUID_7_2_EDX, CPUID_8000_0008_EBX with the AMD bits set from Linux's own
features, CPUID_8000_0021_EAX with LFENCE_RDTSC, VERW_CLEAR, SBPB, IBPB_BRTYPE, SRSO_NO synthesised, and
CPUID_8000_0021_ECX TSA_SQ_NO/TSA_L1_NO, which SYNTHESIZED_F set unconditionally, on affected Zen 3/4 hosts too,
until Carlos Lopez's fix on kvm@vger in 2025, "Switch to SCATTERED_F()", Fixes: 31272abd5974 "KVM: SVM: Advertise
TSA CPUID bits to guests"; Firecracker's Milan and Genoa fingerprints show exactly that). Vendor matters: on an
Intel host KVM synthesises every AMD 0x80000008.EBX bit, and on an AMD host the Intel CPUID.(7,0).EDX bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvmit.x86.registers import (
    AMD_80000008_EBX,
    AMD_80000021_EAX,
    ARCH_CAPABILITIES,
    CPUID_7_0_EDX,
    CPUID_7_2_EDX,
    Register,
)


@dataclass(frozen=True)
class KvmView:
    """How KVM treats one register for guests of one vendor's hosts."""

    register: Register
    passes: int  # bits a guest sees exactly as the host has them
    sets: int  # bits KVM may set where the host has 0, never clearing a host's 1

    def informative(self, guest_value: int) -> int:
        """The bits of a guest's reading that say what the hardware has."""
        return self.passes | (self.sets & ~guest_value)


def _mask(reg: Register, *names: str) -> int:
    return sum(reg.bit(n) for n in names)


KVM_VIEWS: dict[tuple[str, str], KvmView] = {
    ("intel", ARCH_CAPABILITIES.key): KvmView(
        ARCH_CAPABILITIES,
        _mask(ARCH_CAPABILITIES, "IBRS_ALL", "RSBA", "TSX_CTRL_MSR", "SBDR_SSDP_NO", "FBSDP_NO", "PSDP_NO",
              "FB_CLEAR", "RRSBA", "PBRSB_NO", "RFDS_CLEAR", "BHI_NO"),
        _mask(ARCH_CAPABILITIES, "RDCL_NO", "SKIP_VMENTRY_L1DFLUSH", "SSB_NO", "MDS_NO", "PSCHANGE_MC_NO",
              "GDS_NO", "RFDS_NO", "ITS_NO"),
    ),
    ("intel", CPUID_7_0_EDX.key): KvmView(
        CPUID_7_0_EDX,
        _mask(CPUID_7_0_EDX, "MD_CLEAR", "SPEC_CTRL", "INTEL_STIBP", "FLUSH_L1D", "SPEC_CTRL_SSBD"),
        _mask(CPUID_7_0_EDX, "ARCH_CAPABILITIES"),  # KVM emulates the MSR for every guest
    ),
    ("intel", CPUID_7_2_EDX.key): KvmView(
        CPUID_7_2_EDX,
        _mask(CPUID_7_2_EDX, "PSFD", "IPRED_CTRL", "RRSBA_CTRL", "DDPD_U", "BHI_CTRL", "MCDT_NO"), 0,
    ),
    ("amd", AMD_80000008_EBX.key): KvmView(
        AMD_80000008_EBX,
        _mask(AMD_80000008_EBX, "IBPB", "IBRS", "STIBP", "STIBP_ALWAYS_ON", "SSBD", "PSFD"),
        _mask(AMD_80000008_EBX, "SSB_NO", "IBPB_RET"),
    ),
    ("amd", AMD_80000021_EAX.key): KvmView(
        AMD_80000021_EAX,
        _mask(AMD_80000021_EAX, "NO_NESTED_DATA_BP", "WRMSR_XX_BASE_NS", "NULL_SEL_CLR_BASE", "AUTOIBRS"),
        _mask(AMD_80000021_EAX, "LFENCE_RDTSC", "VERW_CLEAR", "NO_SMM_CTL_MSR", "SBPB", "IBPB_BRTYPE", "SRSO_NO",
              "SRSO_USER_KERNEL_NO"),
    ),
}
"""(host vendor, register key) -> how KVM shows that register to guests. Registers not listed say nothing."""
