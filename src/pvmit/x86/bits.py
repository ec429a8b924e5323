"""Bit layouts of the registers pvmit reads, writes or shows to guests.

Each member carries the primary source it comes from in its comment. Abbreviations:
  msr-index.h   Linux arch/x86/include/asm/msr-index.h
  cpufeatures.h Linux arch/x86/include/asm/cpufeatures.h
  kvm_para.h    Linux arch/x86/include/uapi/asm/kvm_para.h
  RFC v3        "[RFC PATCH v3 NN/10]" virtual-MSR series, Chao Gao / Zhang Chen, 2024-04-10
                (message ids 20240410143446.797262-N-chao.gao@intel.com), msr-index.h hunks
  Xen           xen-project/xen@c447b730 xen/arch/x86/include/asm/msr-index.h and
                xen/include/public/arch-x86/cpufeatureset.h (names Intel/AMD bits that Linux does not define)
  QEMU          target/i386/cpu.c feature_word_info names (commit 0048035a)
  common.c      Linux arch/x86/kernel/cpu/common.c at torvalds/linux@a508cec6 (September 2025)

Linux snapshots read: msr-index.h at torvalds/linux@002bba56 (about v6.10); cpufeatures.h from linux-next
(late 2024). A bit taken only from a posted patch says so.

The classes are IntFlag with Python's default KEEP boundary: a value with bits that no member names keeps them,
and `pvmit.x86.registers.decode` reports them as unknown instead of dropping them.
"""

from __future__ import annotations

from enum import IntFlag


class SpecCtrl(IntFlag):
    """IA32_SPEC_CTRL, MSR 0x48: speculation controls software sets."""

    IBRS = 1 << 0  # msr-index.h SPEC_CTRL_IBRS
    STIBP = 1 << 1  # msr-index.h SPEC_CTRL_STIBP
    SSBD = 1 << 2  # msr-index.h SPEC_CTRL_SSBD
    IPRED_DIS_U = 1 << 3  # Xen msr-index.h SPEC_CTRL_IPRED_DIS_U (Linux defines no macro)
    IPRED_DIS_S = 1 << 4  # Xen msr-index.h SPEC_CTRL_IPRED_DIS_S
    RRSBA_DIS_U = 1 << 5  # Xen msr-index.h SPEC_CTRL_RRSBA_DIS_U
    RRSBA_DIS_S = 1 << 6  # msr-index.h SPEC_CTRL_RRSBA_DIS_S
    PSFD = 1 << 7  # Xen msr-index.h SPEC_CTRL_PSFD (Intel and AMD; Linux has only the CPUID bits)
    DDPD_U = 1 << 8  # illumos x86_archext.h IA32_SPEC_CTRL_DDPD_U; Xen calls it SPEC_CTRL_DDP_DIS_U
    BHI_DIS_S = 1 << 10  # msr-index.h SPEC_CTRL_BHI_DIS_S


class ArchCapabilities(IntFlag):
    """IA32_ARCH_CAPABILITIES, MSR 0x10a: read-only enumeration of what the CPU is not affected by or has."""

    RDCL_NO = 1 << 0  # msr-index.h ARCH_CAP_RDCL_NO: not vulnerable to Meltdown
    IBRS_ALL = 1 << 1  # msr-index.h ARCH_CAP_IBRS_ALL: enhanced IBRS (eIBRS)
    RSBA = 1 << 2  # msr-index.h ARCH_CAP_RSBA: RET may predict from the BTB when the RSB underflows
    SKIP_VMENTRY_L1DFLUSH = 1 << 3  # msr-index.h ARCH_CAP_SKIP_VMENTRY_L1DFLUSH
    SSB_NO = 1 << 4  # msr-index.h ARCH_CAP_SSB_NO
    MDS_NO = 1 << 5  # msr-index.h ARCH_CAP_MDS_NO
    PSCHANGE_MC_NO = 1 << 6  # msr-index.h ARCH_CAP_PSCHANGE_MC_NO
    TSX_CTRL_MSR = 1 << 7  # msr-index.h ARCH_CAP_TSX_CTRL_MSR
    TAA_NO = 1 << 8  # msr-index.h ARCH_CAP_TAA_NO
    MCU_CONTROL = 1 << 9  # Xen cpufeatureset.h MCU_CTRL (16*32+9); illumos disagrees (bit 10), Xen followed
    MISC_PACKAGE_CTLS = 1 << 10  # Xen cpufeatureset.h MISC_PKG_CTRL (16*32+10); KVM x86.c comment
    ENERGY_FILTERING_CTL = 1 << 11  # Xen cpufeatureset.h ENERGY_FILTERING (16*32+11); KVM x86.c comment
    DOITM = 1 << 12  # Xen cpufeatureset.h DOITM (16*32+12): data operand independent timing mode
    SBDR_SSDP_NO = 1 << 13  # msr-index.h ARCH_CAP_SBDR_SSDP_NO
    FBSDP_NO = 1 << 14  # msr-index.h ARCH_CAP_FBSDP_NO
    PSDP_NO = 1 << 15  # msr-index.h ARCH_CAP_PSDP_NO
    MCU_ENUMERATION = 1 << 16  # Xen cpufeatureset.h MCU_EXT (16*32+16): MCU_STATUS/ENUM MSRs
    FB_CLEAR = 1 << 17  # msr-index.h ARCH_CAP_FB_CLEAR
    FB_CLEAR_CTRL = 1 << 18  # msr-index.h ARCH_CAP_FB_CLEAR_CTRL
    RRSBA = 1 << 19  # msr-index.h ARCH_CAP_RRSBA: restricted RSBA behaviour (same-mode BTB use on RSB underflow)
    BHI_NO = 1 << 20  # msr-index.h ARCH_CAP_BHI_NO: not affected by branch history injection
    XAPIC_DISABLE = 1 << 21  # msr-index.h ARCH_CAP_XAPIC_DISABLE
    OVERCLOCKING_STATUS = 1 << 23  # Xen cpufeatureset.h OVRCLK_STATUS (16*32+23); KVM x86.c comment
    PBRSB_NO = 1 << 24  # msr-index.h ARCH_CAP_PBRSB_NO
    GDS_CTRL = 1 << 25  # msr-index.h ARCH_CAP_GDS_CTRL
    GDS_NO = 1 << 26  # msr-index.h ARCH_CAP_GDS_NO
    RFDS_NO = 1 << 27  # msr-index.h ARCH_CAP_RFDS_NO
    RFDS_CLEAR = 1 << 28  # msr-index.h ARCH_CAP_RFDS_CLEAR
    IGN_UMONITOR = 1 << 29  # Xen cpufeatureset.h IGN_UMONITOR (16*32+29)
    MON_UMON_MITG = 1 << 30  # Xen cpufeatureset.h MON_UMON_MITG (16*32+30)
    PB_OPT_CTRL = 1 << 32  # Xen cpufeatureset.h PB_OPT_CTRL (16*32+32): MSR_PB_OPT_CTRL.IBPB_ALT
    ITS_NO = 1 << 62  # ARCH_CAP_ITS_NO, ITS series (Pawan Gupta, v6.15; patch): synthesized by VMMs, never by HW
    VIRTUAL_ENUM = 1 << 63  # RFC v3 ARCH_CAP_VIRTUAL_ENUM: MSR_VIRTUAL_ENUMERATION (0x50000000) exists


class Cpuid7_0Edx(IntFlag):
    """CPUID.(EAX=7,ECX=0).EDX, the speculation-related bits (cpufeatures.h word 18)."""

    SRBDS_CTRL = 1 << 9  # cpufeatures.h X86_FEATURE_SRBDS_CTRL (18*32+9)
    MD_CLEAR = 1 << 10  # cpufeatures.h X86_FEATURE_MD_CLEAR (18*32+10)
    RTM_ALWAYS_ABORT = 1 << 11  # cpufeatures.h X86_FEATURE_RTM_ALWAYS_ABORT (18*32+11)
    TSX_FORCE_ABORT = 1 << 13  # cpufeatures.h X86_FEATURE_TSX_FORCE_ABORT (18*32+13)
    HYBRID_CPU = 1 << 15  # cpufeatures.h X86_FEATURE_HYBRID_CPU (18*32+15)
    SPEC_CTRL = 1 << 26  # cpufeatures.h X86_FEATURE_SPEC_CTRL: IBRS and IBPB (18*32+26)
    INTEL_STIBP = 1 << 27  # cpufeatures.h X86_FEATURE_INTEL_STIBP (18*32+27)
    FLUSH_L1D = 1 << 28  # cpufeatures.h X86_FEATURE_FLUSH_L1D (18*32+28)
    ARCH_CAPABILITIES = 1 << 29  # cpufeatures.h X86_FEATURE_ARCH_CAPABILITIES (18*32+29)
    CORE_CAPABILITIES = 1 << 30  # cpufeatures.h X86_FEATURE_CORE_CAPABILITIES (18*32+30)
    SPEC_CTRL_SSBD = 1 << 31  # cpufeatures.h X86_FEATURE_SPEC_CTRL_SSBD (18*32+31)


class Cpuid7_2Edx(IntFlag):
    """CPUID.(EAX=7,ECX=2).EDX: per-control enumeration of the newer IA32_SPEC_CTRL bits."""

    PSFD = 1 << 0  # KVM reverse_cpuid.h X86_FEATURE_INTEL_PSFD; Xen INTEL_PSFD; QEMU "intel-psfd"
    IPRED_CTRL = 1 << 1  # KVM reverse_cpuid.h X86_FEATURE_IPRED_CTRL: IPRED_DIS_U/S exist; QEMU "ipred-ctrl"
    RRSBA_CTRL = 1 << 2  # cpufeatures.h X86_FEATURE_RRSBA_CTRL (scattered.c: EDX bit 2 of leaf 7 subleaf 2)
    DDPD_U = 1 << 3  # KVM reverse_cpuid.h X86_FEATURE_DDPD_U; Xen DDP_CTRL; QEMU "ddpd-u"
    BHI_CTRL = 1 << 4  # cpufeatures.h X86_FEATURE_BHI_CTRL "BHI_DIS_S HW control available" (scattered.c)
    MCDT_NO = 1 << 5  # KVM reverse_cpuid.h X86_FEATURE_MCDT_NO; QEMU "mcdt-no"
    UC_LOCK_DISABLE = 1 << 6  # Xen cpufeatureset.h UC_LOCK_DIS (Xen e0d0af23, "cpuid features for Sierra Forest")


class AmdCpuid80000008Ebx(IntFlag):
    """CPUID 0x80000008.EBX, AMD speculation-control enumeration (cpufeatures.h word 13)."""

    IBPB = 1 << 12  # cpufeatures.h X86_FEATURE_AMD_IBPB (13*32+12)
    IBRS = 1 << 14  # cpufeatures.h X86_FEATURE_AMD_IBRS (13*32+14)
    STIBP = 1 << 15  # cpufeatures.h X86_FEATURE_AMD_STIBP (13*32+15)
    IBRS_ALWAYS_ON = 1 << 16  # Xen cpufeatureset.h IBRS_ALWAYS; FreeBSD AMDFEID_IBRS_ALWAYSON (not in Linux)
    STIBP_ALWAYS_ON = 1 << 17  # cpufeatures.h X86_FEATURE_AMD_STIBP_ALWAYS_ON (13*32+17)
    IBRS_PREFERRED = 1 << 18  # Xen cpufeatureset.h IBRS_FAST; FreeBSD AMDFEID_PREFER_IBRS (not in Linux)
    IBRS_SAME_MODE = 1 << 19  # cpufeatures.h X86_FEATURE_AMD_IBRS_SAME_MODE (13*32+19)
    PPIN = 1 << 23  # cpufeatures.h X86_FEATURE_AMD_PPIN (13*32+23)
    SSBD = 1 << 24  # cpufeatures.h X86_FEATURE_AMD_SSBD (13*32+24)
    VIRT_SSBD = 1 << 25  # cpufeatures.h X86_FEATURE_VIRT_SSBD (13*32+25)
    SSB_NO = 1 << 26  # cpufeatures.h X86_FEATURE_AMD_SSB_NO (13*32+26)
    CPPC = 1 << 27  # cpufeatures.h X86_FEATURE_CPPC (13*32+27)
    PSFD = 1 << 28  # cpufeatures.h X86_FEATURE_AMD_PSFD (13*32+28)
    BTC_NO = 1 << 29  # cpufeatures.h X86_FEATURE_BTC_NO (13*32+29): not affected by branch type confusion
    IBPB_RET = 1 << 30  # cpufeatures.h X86_FEATURE_AMD_IBPB_RET (13*32+30)


class AmdCpuid80000021Eax(IntFlag):
    """CPUID 0x80000021.EAX, AMD extended feature identification 2 (cpufeatures.h word 20)."""

    NO_NESTED_DATA_BP = 1 << 0  # cpufeatures.h X86_FEATURE_NO_NESTED_DATA_BP (20*32+0)
    WRMSR_XX_BASE_NS = 1 << 1  # cpufeatures.h X86_FEATURE_WRMSR_XX_BASE_NS (20*32+1)
    LFENCE_RDTSC = 1 << 2  # cpufeatures.h X86_FEATURE_LFENCE_RDTSC (20*32+2): LFENCE always serializing
    VERW_CLEAR = 1 << 5  # X86_FEATURE_VERW_CLEAR (20*32+5), TSA series 2025 (patch; "bit 5, not bit 10")
    NULL_SEL_CLR_BASE = 1 << 6  # cpufeatures.h X86_FEATURE_NULL_SEL_CLR_BASE (20*32+6)
    AUTOIBRS = 1 << 8  # cpufeatures.h X86_FEATURE_AUTOIBRS (20*32+8): Automatic IBRS (Linux treats as eIBRS)
    NO_SMM_CTL_MSR = 1 << 9  # cpufeatures.h X86_FEATURE_NO_SMM_CTL_MSR (20*32+9)
    ERAPS = 1 << 24  # X86_FEATURE_ERAPS (20*32+24), patch only; QEMU "eraps": enhanced RAP security
    SBPB = 1 << 27  # cpufeatures.h X86_FEATURE_SBPB (20*32+27)
    IBPB_BRTYPE = 1 << 28  # cpufeatures.h X86_FEATURE_IBPB_BRTYPE (20*32+28)
    SRSO_NO = 1 << 29  # cpufeatures.h X86_FEATURE_SRSO_NO (20*32+29)
    SRSO_USER_KERNEL_NO = 1 << 30  # cpufeatures.h X86_FEATURE_SRSO_USER_KERNEL_NO (20*32+30)
    SRSO_MSR_FIX = 1 << 31  # cpufeatures.h X86_FEATURE_SRSO_BP_SPEC_REDUCE (20*32+31)


class AmdCpuid80000021Ecx(IntFlag):
    """CPUID 0x80000021.ECX: the Transient Scheduler Attack "not affected" bits (cpufeatures.h word 20 extension).

    AMD's TSA guidance defines them for hypervisors to show guests on hosts that are not affected; real Zen 3/4/5
    parts read 0 (InstLatx64 dumps of Milan, Genoa, Turin). Linux sets them itself on bare-metal parts that are not
    Zen 3/4 (amd.c tsa_init) and forces X86_BUG_TSA on Zen guests that are not shown both (common.c)."""

    TSA_SQ_NO = 1 << 1  # cpufeatures.h X86_FEATURE_TSA_SQ_NO (21*32+11, scattered): "AMD CPU not vulnerable to TSA-SQ"
    TSA_L1_NO = 1 << 2  # cpufeatures.h X86_FEATURE_TSA_L1_NO (21*32+12, scattered): "... not vulnerable to TSA-L1"


class LinuxVulnBlacklist(IntFlag):
    """The flags of a model's entry in Linux's cpu_vuln_blacklist[] (common.c): which bugs Linux sets for that
    family/model/stepping on bare metal. Not a hardware register: Linux's classification of a part, kept with the
    register facts so that every decision reads it the same way. The bit numbers are common.c's BIT(n)."""

    SRBDS = 1 << 0  # common.c SRBDS: Special Register Buffer Data Sampling
    MMIO = 1 << 1  # common.c MMIO: "CPU is affected by X86_BUG_MMIO_STALE_DATA"
    MMIO_SBDS = 1 << 2  # common.c MMIO_SBDS: Shared Buffers Data Sampling, a variant of MMIO Stale Data
    RETBLEED = 1 << 3  # common.c RETBLEED: "CPU is affected by RETbleed, speculating where you would not expect it"
    SMT_RSB = 1 << 4  # common.c SMT_RSB: "CPU is affected by SMT (cross-thread) return predictions"
    SRSO = 1 << 5  # common.c SRSO: "CPU is affected by SRSO"
    GDS = 1 << 6  # common.c GDS: "CPU is affected by GDS"
    RFDS = 1 << 7  # common.c RFDS: "CPU is affected by Register File Data Sampling"
    ITS = 1 << 8  # common.c ITS: "CPU is affected by Indirect Target Selection"
    ITS_NATIVE_ONLY = 1 << 9  # common.c ITS_NATIVE_ONLY: "... but guest-host isolation is not affected"
    TSA = 1 << 10  # common.c TSA: "CPU is affected by Transient Scheduler Attacks"
    VMSCAPE = 1 << 11  # common.c VMSCAPE: "CPU is affected by VMSCAPE"


class VirtualEnumeration(IntFlag):
    """MSR_VIRTUAL_ENUMERATION, 0x50000000, read-only: which virtual MSRs exist (RFC v3)."""

    MITIGATION_CTRL_SUPPORT = 1 << 0  # RFC v3 VIRT_ENUM_MITIGATION_CTRL_SUPPORT
    LONG_BHB_NEEDED = 1 << 1  # pvmit's proposal (docs/interface.md section 9): the long BHB-clearing loop is needed
    POOL_DESCRIPTION = 1 << 2  # pvmit's proposal (section 10): the pool description MSRs at 0x50000010 exist


class MitigationEnum(IntFlag):
    """MSR_VIRTUAL_MITIGATION_ENUM, 0x50000001, read-only: which requests the VMM can honour (RFC v3)."""

    BHB_CLEAR_SEQ_S_SUPPORT = 1 << 0  # RFC v3 MITI_ENUM_BHB_CLEAR_SEQ_S_SUPPORT: VMM can deploy BHI_DIS_S
    RETPOLINE_S_SUPPORT = 1 << 1  # RFC v3 MITI_ENUM_RETPOLINE_S_SUPPORT: VMM can deploy RRSBA_DIS_S


class MitigationCtrl(IntFlag):
    """MSR_VIRTUAL_MITIGATION_CTRL, 0x50000002, read-write per vCPU: the software mitigations in use (RFC v3)."""

    BHB_CLEAR_SEQ_S_USED = 1 << 0  # RFC v3 MITI_CTRL_BHB_CLEAR_SEQ_S_USED: guest uses the short BHB-clearing loop
    RETPOLINE_S_USED = 1 << 1  # RFC v3 MITI_CTRL_RETPOLINE_S_USED: guest kernel uses retpoline


class KvmFeatures(IntFlag):
    """CPUID 0x40000001.EAX, KVM paravirtual features (kvm_para.h; Documentation/virt/kvm/x86/cpuid.rst)."""

    CLOCKSOURCE = 1 << 0  # kvm_para.h KVM_FEATURE_CLOCKSOURCE
    NOP_IO_DELAY = 1 << 1  # kvm_para.h KVM_FEATURE_NOP_IO_DELAY
    MMU_OP = 1 << 2  # kvm_para.h KVM_FEATURE_MMU_OP (deprecated)
    CLOCKSOURCE2 = 1 << 3  # kvm_para.h KVM_FEATURE_CLOCKSOURCE2
    ASYNC_PF = 1 << 4  # kvm_para.h KVM_FEATURE_ASYNC_PF
    STEAL_TIME = 1 << 5  # kvm_para.h KVM_FEATURE_STEAL_TIME
    PV_EOI = 1 << 6  # kvm_para.h KVM_FEATURE_PV_EOI
    PV_UNHALT = 1 << 7  # kvm_para.h KVM_FEATURE_PV_UNHALT
    PV_TLB_FLUSH = 1 << 9  # kvm_para.h KVM_FEATURE_PV_TLB_FLUSH
    ASYNC_PF_VMEXIT = 1 << 10  # kvm_para.h KVM_FEATURE_ASYNC_PF_VMEXIT
    PV_SEND_IPI = 1 << 11  # kvm_para.h KVM_FEATURE_PV_SEND_IPI
    POLL_CONTROL = 1 << 12  # kvm_para.h KVM_FEATURE_POLL_CONTROL
    PV_SCHED_YIELD = 1 << 13  # kvm_para.h KVM_FEATURE_PV_SCHED_YIELD
    ASYNC_PF_INT = 1 << 14  # kvm_para.h KVM_FEATURE_ASYNC_PF_INT
    MSI_EXT_DEST_ID = 1 << 15  # kvm_para.h KVM_FEATURE_MSI_EXT_DEST_ID
    HC_MAP_GPA_RANGE = 1 << 16  # kvm_para.h KVM_FEATURE_HC_MAP_GPA_RANGE
    MIGRATION_CONTROL = 1 << 17  # kvm_para.h KVM_FEATURE_MIGRATION_CONTROL
    CLOCKSOURCE_STABLE_BIT = 1 << 24  # kvm_para.h KVM_FEATURE_CLOCKSOURCE_STABLE_BIT

