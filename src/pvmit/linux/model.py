"""(d) Which spectre_v2 mode, BHI mitigation and ITS mitigation a Linux guest kernel picks when shown a CPU. Pure.

A model of arch/x86/kernel/cpu/bugs.c (spectre_v2_parse_cmdline, spectre_v2_select_mitigation,
spectre_v2_update_mitigation, spec_ctrl_disable_kernel_rrsba, bhi_select/apply_mitigation, its_select/
update_mitigation, spectre_bhi_state) and common.c (cpu_set_bug_bits, vulnerable_to_its) for a kernel built with
Debian's configuration (CONFIG_MITIGATION_RETPOLINE, _IBRS_ENTRY, _SPECTRE_BHI, _ITS, _CALL_DEPTH_TRACKING all =y,
CONFIG_KVM=m), for any kernel version from 5.10 to 6.18: each place where versions differ asks `Kernel.has(rule)`,
and the rules, with the commits and the stable releases that carry them, are data (linux/kernels.toml). The CPU
given is what the guest is shown: bits that are unknown in the facts are not shown. The model-number tables Linux
uses are data too: linux/tables.toml.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.linux.kernel import CURRENT, Kernel
from pvmit.linux.spectre_v2 import MODE_STRINGS, OLD_MODE_STRINGS, Bhi, Its, V2Mode

_V2_OPTIONS: dict[str, V2Mode | None] = {
    "auto": None, "on": None, "off": V2Mode.NONE,
    "retpoline": V2Mode.RETPOLINE, "retpoline,generic": V2Mode.RETPOLINE,
    "retpoline,lfence": V2Mode.LFENCE, "retpoline,amd": V2Mode.LFENCE,
    "eibrs": V2Mode.EIBRS, "eibrs,lfence": V2Mode.EIBRS_LFENCE, "eibrs,retpoline": V2Mode.EIBRS_RETPOLINE,
    "ibrs": V2Mode.IBRS,
}
"""spectre_v2= values (bugs.c mitigation_options[]); None means 'choose automatically'."""
_BHI_OPTIONS = ("on", "off", "vmexit", "auto")
"""spectre_bhi= values any covered kernel knows (auto only before 36d4fe147c87, vmexit only since 42c141fbb651)."""
_ITS_OPTIONS = ("on", "off", "force", "vmexit", "stuff")
"""indirect_target_selection= values (bugs.c its_parse_cmdline; stuff since facd226f7e0c)."""
_VECTORS = ("no_user_kernel", "no_user_user", "no_guest_host", "no_guest_guest", "no_cross_thread")
"""mitigations=auto,... attack-vector switches (kernel/cpu.c, since 19c24f7ee39a, v6.17)."""


@dataclass(frozen=True)
class Cmdline:
    """The kernel command-line options that change the spectre_v2, BHI and ITS choices."""

    spectre_v2: str = "auto"
    spectre_bhi: str | None = None  # None: not given (the default differs by version: attack vectors, 6.17)
    retbleed: str = "auto"
    mitigations_off: bool = False
    its: str | None = None
    vectors_off: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, cmdline: str) -> Cmdline:
        """Read spectre_v2=, nospectre_v2, spectre_bhi=, retbleed=, indirect_target_selection=, mitigations= (with
        the attack-vector switches of 6.17+: mitigations=auto,no_guest_host,...) from a command line."""
        v2, retbleed, off, vectors = "auto", "auto", False, frozenset[str]()
        bhi: str | None = None
        its: str | None = None
        for word in cmdline.split():
            key, _, value = word.partition("=")
            if key == "spectre_v2":
                v2 = value
            elif key == "nospectre_v2":
                v2 = "off"
            elif key == "spectre_bhi":
                bhi = value
            elif key == "retbleed":
                retbleed = value
            elif key == "indirect_target_selection":
                its = value
            elif key == "mitigations":
                parts = value.split(",")
                off = parts[0] == "off"
                vectors = frozenset(p for p in parts[1:] if p.startswith("no_"))
        return cls(v2, bhi, retbleed, off, its, vectors).checked()

    def checked(self) -> Cmdline:
        if self.spectre_v2 not in _V2_OPTIONS:
            raise InputError(f"spectre_v2={self.spectre_v2!r} is not an option Linux knows "
                             f"({', '.join(_V2_OPTIONS)})")
        if self.spectre_bhi is not None and self.spectre_bhi not in _BHI_OPTIONS:
            raise InputError(f"spectre_bhi={self.spectre_bhi!r} is not one of {', '.join(_BHI_OPTIONS)}")
        if self.its is not None and self.its not in _ITS_OPTIONS:
            raise InputError(f"indirect_target_selection={self.its!r} is not one of {', '.join(_ITS_OPTIONS)}")
        unknown = sorted(self.vectors_off - set(_VECTORS))
        if unknown:
            raise InputError(f"mitigations=...,{unknown[0]}: not an attack vector Linux knows ({', '.join(_VECTORS)})")
        return self

    def __str__(self) -> str:
        parts = []
        if self.mitigations_off:
            parts.append("mitigations=off")
        elif self.vectors_off:
            parts.append("mitigations=" + ",".join(["auto", *sorted(self.vectors_off)]))
        if self.spectre_v2 != "auto":
            parts.append(f"spectre_v2={self.spectre_v2}")
        if self.spectre_bhi is not None:
            parts.append(f"spectre_bhi={self.spectre_bhi}")
        if self.retbleed != "auto":
            parts.append(f"retbleed={self.retbleed}")
        if self.its is not None:
            parts.append(f"indirect_target_selection={self.its}")
        return " ".join(parts)


@dataclass(frozen=True)
class Prediction:
    """What the guest kernel picks, what it sets in IA32_SPEC_CTRL itself, what it prints, and which bits it was
    shown that its choice trusts to stay true (`trusts`: a VMM that migrates it must keep them true)."""

    mode: V2Mode
    bhi: Bhi
    sets_rrsba_dis_s: bool
    sets_bhi_dis_s: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    its: Its = Its.ABSENT
    sysfs_mode: str = ""
    bhi_printed: bool = True
    trusts: tuple[str, ...] = ()
    kernel: str = ""

    @property
    def relies_on(self) -> frozenset[Mitigation]:
        """The software mitigations the RFC's guest code would report in MITIGATION_CTRL."""
        out = set()
        if self.mode.uses_retpoline:
            out.add(Mitigation.RETPOLINE)
        if self.bhi.uses_short_loop:
            out.add(Mitigation.BHB_SHORT)
        return frozenset(out)

    @property
    def sysfs_bhi(self) -> str | None:
        """The BHI field as printed; None where the line has none (kernels before the BHI mitigation, the bare
        'Vulnerable: LFENCE' line), although the kernel may run the loop."""
        return f"BHI: {self.bhi.value}" if self.bhi_printed else None

    @property
    def printed_bhi(self) -> Bhi:
        """What a parser of the printed line finds in the BHI field."""
        return self.bhi if self.bhi_printed else Bhi.NOT_REPORTED

    @property
    def sysfs_line(self) -> str:
        """The spectre_v2 line as far as the model predicts it: the mode, and the BHI field where printed."""
        return self.sysfs_mode + (f"; {self.sysfs_bhi}" if self.sysfs_bhi else "")

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, object]:
        return {
            "kernel": self.kernel, "mode": self.mode.value, "bhi": self.bhi.name, "sysfs_mode": self.sysfs_mode,
            "sysfs_bhi": self.sysfs_bhi, "its": self.its.name, "sysfs_its": self.its.sysfs,
            "sets_rrsba_dis_s": self.sets_rrsba_dis_s, "sets_bhi_dis_s": self.sets_bhi_dis_s,
            "relies_on": sorted(m.value for m in self.relies_on), "trusts": list(self.trusts), "reason": self.reason,
        }


@lru_cache(maxsize=1)
def tables() -> dict[str, Any]:
    """Linux's per-model tables (linux/tables.toml)."""
    return tomllib.loads((resources.files("pvmit.linux") / "tables.toml").read_text(encoding="utf-8"))


def _matches(rows: list[dict[str, Any]], cpu: CpuFacts) -> dict[str, Any] | None:
    for row in rows:
        if row["vendor"] != cpu.vendor:
            continue
        if "families" in row and cpu.family not in row["families"]:
            continue
        if "family" in row and cpu.family != row["family"]:
            continue
        if "models" in row and cpu.model not in row["models"]:
            continue
        if "min_stepping" in row and cpu.stepping is not None and cpu.stepping < row["min_stepping"]:
            continue  # (a stepping the facts do not give matches: the affected side)
        return row
    return None


def _shown(cpu: CpuFacts, key: str, bit: str) -> bool:
    """A bit the guest sees: set and known. (Unknown facts are not shown to a guest.)"""
    return bool(cpu.fact(key, bit).value)


def mode_string(mode: V2Mode, kernel: Kernel) -> tuple[str, bool]:
    """What `kernel` prints for `mode` first on the spectre_v2 line, and whether the other fields (BHI among
    them) follow. Rules retpoline_generic, autoibrs and lfence_fields (linux/kernels.toml)."""
    if not kernel.has("retpoline_generic"):
        return OLD_MODE_STRINGS["before retpoline_generic"][mode], True
    if mode is V2Mode.LFENCE and not kernel.has("lfence_fields"):
        return "Vulnerable: LFENCE", False  # spectre_v2_show_state() printed the bare line (eafd987d4a82)
    if not kernel.has("autoibrs"):
        return OLD_MODE_STRINGS["before autoibrs"][mode], True
    return MODE_STRINGS[mode], True


def predict(cpu: CpuFacts, cmdline: Cmdline = Cmdline(), *, hypervisor: bool = True,
            kernel: Kernel = CURRENT, sev_snp: bool = False) -> Prediction:
    """The spectre_v2 mode, BHI and ITS mitigation `kernel` picks on `cpu` (as shown to it) with `cmdline`.

    hypervisor: X86_FEATURE_HYPERVISOR is set (a guest). sev_snp: a host kernel with SEV-SNP enabled (it then keeps
    AMD's Automatic IBRS off, acaa4b5c4c85); a host fact, meaningless in a guest. InputError when the kernel's
    version cannot be placed against a rule the prediction needs (linux/kernels.toml `unsourced`).
    """
    why: list[str] = [f"kernel: {kernel}"]
    trusts: list[str] = []
    intel = cpu.vendor == "intel"
    arch_caps_visible = intel and _shown(cpu, "cpuid_7_0_edx", "ARCH_CAPABILITIES")

    def cap(bit: str) -> bool:
        return arch_caps_visible and _shown(cpu, "arch_capabilities", bit)

    autoibrs = not intel and _shown(cpu, "cpuid_80000021_eax", "AUTOIBRS") and kernel.has("autoibrs")
    if autoibrs and sev_snp and not hypervisor and kernel.has("snp_no_autoibrs"):
        autoibrs = False
        why.append("SEV-SNP host: Automatic IBRS not used (acaa4b5c4c85)")
    eibrs = cap("IBRS_ALL") or autoibrs
    ibrs_feature = _shown(cpu, "cpuid_7_0_edx", "SPEC_CTRL") if intel else \
        _shown(cpu, "cpuid_80000008_ebx", "IBRS")
    btc_no = not intel and _shown(cpu, "cpuid_80000008_ebx", "BTC_NO")
    retbleed_row = _matches(tables()["retbleed"], cpu)
    bug_retbleed = not btc_no and (retbleed_row is not None or cap("RSBA"))
    rrsba, rrsba_ctrl = cap("RRSBA"), intel and _shown(cpu, "cpuid_7_2_edx", "RRSBA_CTRL")
    bhi_ctrl = intel and _shown(cpu, "cpuid_7_2_edx", "BHI_CTRL")
    hidden = [f"{k}.{b}" for k, b in (("arch_capabilities", "IBRS_ALL"), ("arch_capabilities", "RRSBA"),
                                     ("cpuid_7_2_edx", "RRSBA_CTRL"), ("cpuid_7_2_edx", "BHI_CTRL"))
              if intel and cpu.fact(k, b).value is None]
    why.append(f"shown: eIBRS={int(eibrs)} RRSBA={int(rrsba)} RRSBA_CTRL={int(rrsba_ctrl)} "
               f"BHI_CTRL={int(bhi_ctrl)} ARCH_CAPABILITIES {'visible' if arch_caps_visible else 'not enumerated'}"
               + (f" (unknown, so not shown: {', '.join(hidden)})" if hidden else ""))

    # Attack vectors (6.17+): with no switch, user->kernel is mitigated, guest->host only in kernels built with KVM
    vectors = kernel.has("attack_vectors")
    user_kernel = vectors and "no_user_kernel" not in cmdline.vectors_off
    guest_host = vectors and kernel.kvm and "no_guest_host" not in cmdline.vectors_off
    if vectors and not (user_kernel and guest_host):
        why.append(f"attack vectors: user->kernel {'on' if user_kernel else 'off'}, guest->host "
                   f"{'on' if guest_host else 'off'}" + ("" if kernel.kvm else " (built without KVM)"))

    # spectre_v2_parse_cmdline: an option the kernel or the CPU cannot honour falls back to AUTO
    cmd = "none" if cmdline.mitigations_off else "auto" if cmdline.spectre_v2 in ("auto", "on") else \
        cmdline.spectre_v2
    if cmd.startswith("eibrs") or cmd == "retpoline,lfence":
        if not kernel.has("retpoline_generic"):
            why.append(f"spectre_v2={cmd}: an option this kernel does not know: auto")
            cmd = "auto"
    if cmd == "retpoline,amd" and intel and not kernel.has("retpoline_generic"):
        why.append("spectre_v2=retpoline,amd on a non-AMD CPU: this kernel switches to auto")
        cmd = "auto"
    if cmd == "ibrs" and not kernel.has("kernel_ibrs"):
        why.append("spectre_v2=ibrs: an option this kernel does not know: auto")
        cmd = "auto"
    requested = _V2_OPTIONS.get(cmd)
    if requested in (V2Mode.EIBRS, V2Mode.EIBRS_LFENCE, V2Mode.EIBRS_RETPOLINE) and not eibrs:
        why.append(f"spectre_v2={cmd} without eIBRS: bugs.c falls back to auto")
        cmd = "auto"
    # The LFENCE options need X86_FEATURE_LFENCE_RDTSC, which init_intel, init_amd and init_hygon set on every CPU
    # with SSE2 (every x86-64 CPU), whatever CPUID 0x80000021 says; so they are never refused for that. The Linux
    # oracle showed it: Debian's 6.1.192 on QEMU's EPYC-Rome, which enumerates nothing, printed "LFENCE"
    # (tests/fixtures/linux_oracle.json, case epyc-rome:retpoline-lfence; amd.c:1232-1244 of 6.1.192).
    if requested is V2Mode.IBRS and (not intel or not ibrs_feature):
        why.append("spectre_v2=ibrs needs an Intel CPU with IBRS: bugs.c falls back to auto")
        cmd = "auto"

    # spectre_v2_select_mitigation
    if cmd == "none":
        mode = V2Mode.NONE
        why.append("mitigations=off" if cmdline.mitigations_off else "spectre_v2=off")
    elif cmd == "auto" and vectors and not (user_kernel or guest_host):
        mode = V2Mode.NONE
        why.append("auto with neither the user->kernel nor the guest->host vector: no spectre_v2 mitigation")
    elif cmd == "auto":
        if eibrs:
            mode = V2Mode.EIBRS
            why.append("auto: eIBRS shown")
        elif not intel and not kernel.has("retpoline_generic"):
            mode = V2Mode.LFENCE
            why.append("auto on AMD before 5.17: the AMD (LFENCE) retpoline (244d00b5dd47 made it generic)")
        else:
            mode = V2Mode.RETPOLINE
            why.append("auto: no eIBRS shown, retpoline")
        # spectre_v2_update_mitigation: Retbleed-affected Intel parts use IBRS instead of retpoline in auto mode
        if (mode is V2Mode.RETPOLINE and intel and bug_retbleed and ibrs_feature
                and cmdline.retbleed not in ("off", "stuff") and kernel.has("kernel_ibrs")):
            mode = V2Mode.IBRS
            src = "Linux RETBLEED model list" if retbleed_row else "RSBA shown"
            why.append(f"X86_BUG_RETBLEED ({src}) with IBRS: IBRS instead of retpoline")
    else:
        mode = _V2_OPTIONS[cmd] or V2Mode.RETPOLINE
        why.append(f"spectre_v2={cmd}" + (" (IBRS on an eIBRS CPU: kept, with a performance warning)"
                                          if mode is V2Mode.IBRS and eibrs else ""))

    # X86_FEATURE_RETPOLINE / _LFENCE as set by spectre_v2_select_mitigation
    feat_retpoline = mode in (V2Mode.RETPOLINE, V2Mode.EIBRS_RETPOLINE, V2Mode.LFENCE, V2Mode.EIBRS_LFENCE)
    feat_retpoline_lfence = mode in (V2Mode.LFENCE, V2Mode.EIBRS_LFENCE)
    # spec_ctrl_disable_kernel_rrsba ("Disable RRSBA behavior", with kernel IBRS in 5.19), called for RETPOLINE,
    # EIBRS_LFENCE and EIBRS_RETPOLINE
    rrsba_modes = mode in (V2Mode.RETPOLINE, V2Mode.EIBRS_LFENCE, V2Mode.EIBRS_RETPOLINE) and kernel.has("kernel_ibrs")
    sets_rrsba = rrsba_modes and rrsba and rrsba_ctrl

    bhi, sets_bhi_dis, printed = _bhi(cpu, cmdline, kernel, why, trusts, cap=cap, eibrs=eibrs, hypervisor=hypervisor,
                                      mode=mode, feat_retpoline=feat_retpoline,
                                      feat_retpoline_lfence=feat_retpoline_lfence, rrsba=rrsba,
                                      rrsba_ctrl=rrsba_ctrl, rrsba_modes=rrsba_modes, bhi_ctrl=bhi_ctrl,
                                      vectors=(vectors, user_kernel, guest_host))
    its = _its(cpu, cmdline, kernel, why, trusts, cap=cap, hypervisor=hypervisor, mode=mode, bhi_ctrl=bhi_ctrl,
               vectors=(vectors, user_kernel, guest_host))
    text, fields = mode_string(mode, kernel)
    return Prediction(mode, bhi, sets_rrsba, sets_bhi_dis, tuple(why), its, text, printed and fields,
                      tuple(trusts), str(kernel))


def _bhi(cpu: CpuFacts, cmdline: Cmdline, kernel: Kernel, why: list[str], trusts: list[str], *, cap: Any,
         eibrs: bool, hypervisor: bool, mode: V2Mode, feat_retpoline: bool, feat_retpoline_lfence: bool,
         rrsba: bool, rrsba_ctrl: bool, rrsba_modes: bool, bhi_ctrl: bool,
         vectors: tuple[bool, bool, bool]) -> tuple[Bhi, bool, bool]:
    """cpu_set_bug_bits (X86_BUG_BHI), bhi_select/update/apply_mitigation and spectre_bhi_state: the BHI state,
    whether BHI_DIS_S is set, and whether the line has a BHI field at all."""
    if not kernel.has("bhi"):
        why.append("no BHI mitigation in this kernel (ec9404e40e8f, v6.9): no BHI field, no loop")
        return Bhi.NOT_REPORTED, False, False
    no_bhi = _matches(tables()["no_bhi"], cpu) is not None
    bhi_no_trusted = cap("BHI_NO") and not kernel.has("bhi_no_ignored")
    bug_bhi = not no_bhi and (eibrs or hypervisor) and not bhi_no_trusted
    if bhi_no_trusted and not no_bhi and (eibrs or hypervisor):
        trusts.append("arch_capabilities.BHI_NO")
        why.append("BHI_NO shown: this kernel skips X86_BUG_BHI (ignored since 9f725eec8fc0)")
    if not bug_bhi:
        why.append("not affected by BHI (Linux NO_BHI list)" if no_bhi else "X86_BUG_BHI not set")
        return Bhi.NOT_AFFECTED, False, True

    # bhi_mitigation: the option (when this kernel knows it), else the default
    av, user_kernel, guest_host = vectors
    opt = cmdline.spectre_bhi or "default"
    if opt == "vmexit" and not kernel.has("bhi_vmexit"):
        why.append("spectre_bhi=vmexit: an option this kernel ignores ('Ignoring unknown spectre_bhi option')")
        opt = "default"
    if opt == "auto" and kernel.has("bhi_fixes"):
        why.append("spectre_bhi=auto: removed by 36d4fe147c87, ignored")
        opt = "default"
    if opt == "default":
        if av:
            opt = ("on" if user_kernel else "vmexit") if guest_host else "off"
            if opt != "on":
                why.append(f"attack vectors: spectre_bhi defaults to {opt}")
        else:
            opt = "on"
    if mode is V2Mode.NONE:
        opt = "off"  # bhi_update_mitigation: spectre_v2=off (or mitigations=off) turns BHI off too

    fixes = kernel.has("bhi_fixes")
    retpoline_for_bhi = feat_retpoline and not (feat_retpoline_lfence and kernel.has("bhi_retpoline_check"))
    clear_hw = clear_loop = clear_vmexit = False
    if fixes:
        rrsba_disabled = (rrsba_modes or (opt != "off" and retpoline_for_bhi)) and (not rrsba or rrsba_ctrl)
        covered = retpoline_for_bhi and rrsba_disabled
    else:  # before 1cea8a280dfd: retpoline covers BHI only where ARCH_CAP_RRSBA is clear
        covered = retpoline_for_bhi and not rrsba
    if opt != "off" and not covered:
        if bhi_ctrl:
            clear_hw = True
        elif opt == "vmexit":
            clear_vmexit = True
        else:
            clear_vmexit = True
            clear_loop = opt == "on"
    if clear_hw:
        why.append("BHI_CTRL shown: sets BHI_DIS_S")
        return Bhi.BHI_DIS_S, True, True
    if clear_loop:
        why.append("no BHI_CTRL shown: short BHB-clearing loop on syscall")
        return Bhi.SW_LOOP, False, True
    if covered:
        why.append("retpoline with RRSBA disabled covers BHI")
        return Bhi.RETPOLINE, False, True
    if clear_vmexit:
        return (Bhi.VMEXIT_ONLY if fixes else Bhi.SYSCALL_HARDENING), False, True
    return (Bhi.VULNERABLE if fixes else Bhi.SYSCALL_HARDENING_VULNERABLE), False, True


def _its(cpu: CpuFacts, cmdline: Cmdline, kernel: Kernel, why: list[str], trusts: list[str], *, cap: Any,
         hypervisor: bool, mode: V2Mode, bhi_ctrl: bool, vectors: tuple[bool, bool, bool]) -> Its:
    """vulnerable_to_its() and its_select/update_mitigation: what indirect_target_selection says."""
    if not kernel.has("its"):
        return Its.ABSENT
    intel = cpu.vendor == "intel"
    opt = cmdline.its or "on"
    if opt == "stuff" and not kernel.has("its_stuff"):
        why.append("indirect_target_selection=stuff: unknown to this kernel, ignored")
        opt = "on"
    row = _matches(tables()["its"], cpu)
    if not intel:
        bug = False
    elif cap("ITS_NO"):
        bug = False
        trusts.append("arch_capabilities.ITS_NO")
        why.append("ITS_NO shown: not affected by ITS")
    elif bhi_ctrl:
        bug = False
        trusts.append("cpuid_7_2_edx.BHI_CTRL")
        why.append("BHI_CTRL shown: not affected by ITS ('None of the affected CPUs have BHI_CTRL')")
    else:
        bug = hypervisor or row is not None
        if hypervisor:
            why.append("Intel guest without ITS_NO: affected by ITS (it may migrate to affected hardware)")
    bug = bug or opt == "force"
    if not bug:
        return Its.NOT_AFFECTED
    native_only = not hypervisor and row is not None and bool(row.get("native_only"))
    av, user_kernel, guest_host = vectors
    if cmdline.mitigations_off or opt == "off" or (av and not (user_kernel or guest_host)):
        return Its.VULNERABLE
    if mode is V2Mode.NONE:
        why.append("ITS: spectre_v2 off disables the ITS mitigation")
        return Its.VULNERABLE
    if mode in (V2Mode.LFENCE, V2Mode.EIBRS_LFENCE):
        why.append("ITS: not compatible with the LFENCE mitigation")
        return Its.VULNERABLE
    if opt == "stuff":
        return Its.RETPOLINE_STUFF if mode in (V2Mode.RETPOLINE, V2Mode.EIBRS_RETPOLINE) else Its.ALIGNED_THUNKS
    if opt == "vmexit" and native_only:
        return Its.VMEXIT_ONLY
    return Its.ALIGNED_THUNKS
