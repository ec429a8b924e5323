"""(d) Which spectre_v2 mode and BHI mitigation a current Linux guest kernel picks when shown a CPU. Pure.

A model of arch/x86/kernel/cpu/bugs.c (spectre_v2_parse_cmdline, spectre_v2_select_mitigation,
spectre_v2_update_mitigation, spec_ctrl_disable_kernel_rrsba, bhi_select/apply_mitigation) and common.c
(cpu_set_bug_bits) for a kernel built with Debian's configuration (CONFIG_MITIGATION_RETPOLINE=y,
CONFIG_MITIGATION_IBRS_ENTRY=y, CONFIG_MITIGATION_SPECTRE_BHI=y). The CPU given is what the guest is shown: bits
that are unknown in the facts are not shown. The model-number tables Linux uses are data: linux/tables.toml.
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
from pvmit.linux.spectre_v2 import MODE_STRINGS, Bhi, V2Mode

_V2_OPTIONS: dict[str, V2Mode | None] = {
    "auto": None, "on": None, "off": V2Mode.NONE,
    "retpoline": V2Mode.RETPOLINE, "retpoline,generic": V2Mode.RETPOLINE,
    "retpoline,lfence": V2Mode.LFENCE, "retpoline,amd": V2Mode.LFENCE,
    "eibrs": V2Mode.EIBRS, "eibrs,lfence": V2Mode.EIBRS_LFENCE, "eibrs,retpoline": V2Mode.EIBRS_RETPOLINE,
    "ibrs": V2Mode.IBRS,
}
"""spectre_v2= values (bugs.c mitigation_options[]); None means 'choose automatically'."""
_BHI_OPTIONS = ("on", "off", "vmexit")


@dataclass(frozen=True)
class Cmdline:
    """The kernel command-line options that change the spectre_v2 and BHI choices."""

    spectre_v2: str = "auto"
    spectre_bhi: str = "on"
    retbleed: str = "auto"
    mitigations_off: bool = False

    @classmethod
    def parse(cls, cmdline: str) -> Cmdline:
        """Read spectre_v2=, nospectre_v2, spectre_bhi=, retbleed=, mitigations= from a command line."""
        v2, bhi, retbleed, off = "auto", "on", "auto", False
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
            elif key == "mitigations":
                off = value == "off"
        return cls(v2, bhi, retbleed, off).checked()

    def checked(self) -> Cmdline:
        if self.spectre_v2 not in _V2_OPTIONS:
            raise InputError(f"spectre_v2={self.spectre_v2!r} is not an option Linux knows "
                             f"({', '.join(_V2_OPTIONS)})")
        if self.spectre_bhi not in _BHI_OPTIONS:
            raise InputError(f"spectre_bhi={self.spectre_bhi!r} is not one of {', '.join(_BHI_OPTIONS)}")
        return self

    def __str__(self) -> str:
        parts = []
        if self.mitigations_off:
            parts.append("mitigations=off")
        if self.spectre_v2 != "auto":
            parts.append(f"spectre_v2={self.spectre_v2}")
        if self.spectre_bhi != "on":
            parts.append(f"spectre_bhi={self.spectre_bhi}")
        if self.retbleed != "auto":
            parts.append(f"retbleed={self.retbleed}")
        return " ".join(parts)


@dataclass(frozen=True)
class Prediction:
    """What the guest kernel picks, what it sets in IA32_SPEC_CTRL itself, and what it would report."""

    mode: V2Mode
    bhi: Bhi
    sets_rrsba_dis_s: bool
    sets_bhi_dis_s: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)

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
    def sysfs_mode(self) -> str:
        return MODE_STRINGS[self.mode]

    @property
    def sysfs_bhi(self) -> str:
        return f"BHI: {self.bhi.value}"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode.value, "bhi": self.bhi.name, "sysfs_mode": self.sysfs_mode,
            "sysfs_bhi": self.sysfs_bhi, "sets_rrsba_dis_s": self.sets_rrsba_dis_s,
            "sets_bhi_dis_s": self.sets_bhi_dis_s, "relies_on": sorted(m.value for m in self.relies_on),
            "reason": self.reason,
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
        return row
    return None


def _shown(cpu: CpuFacts, key: str, bit: str) -> bool:
    """A bit the guest sees: set and known. (Unknown facts are not shown to a guest.)"""
    return bool(cpu.fact(key, bit).value)


def predict(cpu: CpuFacts, cmdline: Cmdline = Cmdline(), *, hypervisor: bool = True,
            honour_bhi_no: bool = False) -> Prediction:
    """The spectre_v2 mode and BHI mitigation Linux picks on `cpu` (as shown to it) with `cmdline`.

    hypervisor: X86_FEATURE_HYPERVISOR is set (a guest). honour_bhi_no: model 6.9-era kernels, which skipped
    X86_BUG_BHI on BHI_NO parts; later kernels ignore BHI_NO ("Parts with BHI_NO still need to use the BHI
    mitigation to prevent Intra-mode attacks").
    """
    why: list[str] = []
    intel = cpu.vendor == "intel"
    arch_caps_visible = intel and _shown(cpu, "cpuid_7_0_edx", "ARCH_CAPABILITIES")

    def cap(bit: str) -> bool:
        return arch_caps_visible and _shown(cpu, "arch_capabilities", bit)

    eibrs = cap("IBRS_ALL") or (not intel and _shown(cpu, "cpuid_80000021_eax", "AUTOIBRS"))
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

    # spectre_v2_parse_cmdline: an option the CPU cannot honour falls back to AUTO ("Switching to AUTO select")
    cmd = "none" if cmdline.mitigations_off else "auto" if cmdline.spectre_v2 in ("auto", "on") else \
        cmdline.spectre_v2
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
    elif cmd == "auto":
        mode = V2Mode.EIBRS if eibrs else V2Mode.RETPOLINE
        why.append("auto: eIBRS shown" if eibrs else "auto: no eIBRS shown, retpoline")
        # spectre_v2_update_mitigation: Retbleed-affected Intel parts use IBRS instead of retpoline in auto mode
        if (mode is V2Mode.RETPOLINE and intel and bug_retbleed and ibrs_feature
                and cmdline.retbleed not in ("off", "stuff")):
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
    # spec_ctrl_disable_kernel_rrsba, called for RETPOLINE, EIBRS_LFENCE and EIBRS_RETPOLINE
    sets_rrsba = mode in (V2Mode.RETPOLINE, V2Mode.EIBRS_LFENCE, V2Mode.EIBRS_RETPOLINE) and rrsba and rrsba_ctrl
    rrsba_disabled = mode in (V2Mode.RETPOLINE, V2Mode.EIBRS_LFENCE, V2Mode.EIBRS_RETPOLINE) and (
        not rrsba or sets_rrsba)

    # cpu_set_bug_bits: X86_BUG_BHI; then bhi_select/apply_mitigation and spectre_bhi_state()
    no_bhi = _matches(tables()["no_bhi"], cpu) is not None
    bug_bhi = not no_bhi and (eibrs or hypervisor) and not (honour_bhi_no and cap("BHI_NO"))
    # bhi_update_mitigation: spectre_v2=off (or mitigations=off) turns the BHI mitigation off too
    bhi_on = mode is not V2Mode.NONE and cmdline.spectre_bhi != "off"
    clear_hw = clear_loop = clear_vmexit = False
    if bug_bhi and bhi_on:
        if feat_retpoline and not feat_retpoline_lfence and rrsba_disabled:
            pass  # "Retpoline is used and RRSBA is disabled: BHI is covered" - nothing more is set
        elif bhi_ctrl:
            clear_hw = True
        elif cmdline.spectre_bhi == "vmexit":
            clear_vmexit = True
        else:
            clear_loop = clear_vmexit = True
    if not bug_bhi:
        bhi = Bhi.NOT_AFFECTED
        why.append("not affected by BHI (Linux NO_BHI list)" if no_bhi else "X86_BUG_BHI not set")
    elif clear_hw:
        bhi = Bhi.BHI_DIS_S
        why.append("BHI_CTRL shown: sets BHI_DIS_S")
    elif clear_loop:
        bhi = Bhi.SW_LOOP
        why.append("no BHI_CTRL shown: short BHB-clearing loop on syscall")
    elif feat_retpoline and not feat_retpoline_lfence and rrsba_disabled:
        bhi = Bhi.RETPOLINE
        why.append("retpoline with RRSBA disabled covers BHI")
    elif clear_vmexit:
        bhi = Bhi.VMEXIT_ONLY
    else:
        bhi = Bhi.VULNERABLE
    return Prediction(mode, bhi, sets_rrsba, clear_hw, tuple(why))
