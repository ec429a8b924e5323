"""Linux's spectre_v2 modes and BHI mitigations, the strings it prints for them in sysfs, and parsing those strings.

Standard library only: the guest agent (`pvmit.agent`) runs this inside small guests.
Strings follow arch/x86/kernel/cpu/bugs.c (spectre_v2_strings[], spectre_bhi_state(), its_strings[]) of every
kernel from 5.10 to 6.18: which kernel prints which wording is in linux/kernels.toml (the parser accepts them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class V2Mode(Enum):
    """enum spectre_v2_mitigation (bugs.c)."""

    NONE = "none"
    RETPOLINE = "retpoline"
    LFENCE = "lfence"
    EIBRS = "eibrs"
    EIBRS_LFENCE = "eibrs,lfence"
    EIBRS_RETPOLINE = "eibrs,retpoline"
    IBRS = "ibrs"

    @property
    def uses_retpoline(self) -> bool:
        """Retpoline thunks in the kernel: exactly the modes in which the RFC's guest sets RETPOLINE_S_USED."""
        return self in (V2Mode.RETPOLINE, V2Mode.EIBRS_RETPOLINE)


class Bhi(Enum):
    """The BHI part of the spectre_v2 line (bugs.c spectre_bhi_state())."""

    NOT_AFFECTED = "Not affected"
    BHI_DIS_S = "BHI_DIS_S"
    SW_LOOP = "SW loop, KVM: SW loop"
    RETPOLINE = "Retpoline"
    VMEXIT_ONLY = "Vulnerable, KVM: SW loop"
    VULNERABLE = "Vulnerable"
    SYSCALL_HARDENING = "Syscall hardening, KVM: SW loop"  # spectre_bhi=auto, in kernels before 5f882f3b0a8b
    SYSCALL_HARDENING_VULNERABLE = "Vulnerable (Syscall hardening enabled)"  # the same kernels, nothing in place
    NOT_REPORTED = "not reported"  # no BHI field: kernels before the 2024 BHI mitigation (no loop), and lines that
    # omit it (WHOLE_LINES; "Vulnerable: LFENCE" on kernels from 6.9 until 2025), whose kernel may run the loop
    UNKNOWN = "unknown"

    @property
    def uses_short_loop(self) -> bool:
        """The kernel runs clear_bhb_loop on syscall entry: the RFC's guest sets BHB_CLEAR_SEQ_S_USED."""
        return self is Bhi.SW_LOOP


MODE_STRINGS: dict[V2Mode, str] = {
    V2Mode.NONE: "Vulnerable",
    V2Mode.RETPOLINE: "Mitigation: Retpolines",
    V2Mode.LFENCE: "Vulnerable: LFENCE",  # since 2025 (bugs.c d1cc1bae); Debian's 6.1.192 prints it too
    V2Mode.EIBRS: "Mitigation: Enhanced / Automatic IBRS",
    V2Mode.EIBRS_LFENCE: "Mitigation: Enhanced / Automatic IBRS + LFENCE",
    V2Mode.EIBRS_RETPOLINE: "Mitigation: Enhanced / Automatic IBRS + Retpolines",
    V2Mode.IBRS: "Mitigation: IBRS",
}
"""bugs.c spectre_v2_strings[] (current mainline)."""

_OLD_HEADS = {
    "Mitigation: Enhanced IBRS": V2Mode.EIBRS,  # before AutoIBRS support (e7862eda309e, v6.3; 6.1.84)
    "Mitigation: Enhanced IBRS + LFENCE": V2Mode.EIBRS_LFENCE,
    "Mitigation: Enhanced IBRS + Retpolines": V2Mode.EIBRS_RETPOLINE,
    "Mitigation: Full generic retpoline": V2Mode.RETPOLINE,  # before v5.17 (the Spectre-BHB series, 244d00b5dd47)
    "Mitigation: Full AMD retpoline": V2Mode.LFENCE,
    "Mitigation: LFENCE": V2Mode.LFENCE,  # the string before d1cc1baef67a (v6.18); sysfs printed "Vulnerable: LFENCE"
}

OLD_MODE_STRINGS: dict[str, dict[V2Mode, str]] = {
    "before retpoline_generic": {V2Mode.NONE: "Vulnerable", V2Mode.RETPOLINE: "Mitigation: Full generic retpoline",
                                 V2Mode.LFENCE: "Mitigation: Full AMD retpoline",
                                 V2Mode.EIBRS: "Mitigation: Enhanced IBRS"},
    "before autoibrs": {**MODE_STRINGS, V2Mode.EIBRS: "Mitigation: Enhanced IBRS",
                        V2Mode.EIBRS_LFENCE: "Mitigation: Enhanced IBRS + LFENCE",
                        V2Mode.EIBRS_RETPOLINE: "Mitigation: Enhanced IBRS + Retpolines"},
}
"""spectre_v2_strings[] of older kernels (linux/kernels.toml says which: rules retpoline_generic and autoibrs)."""

MODULE_SUFFIX = " - vulnerable module loaded"
"""spectre_v2_module_string(): appended to the whole line once a module built without retpoline is loaded."""

WHOLE_LINES = {
    "Vulnerable: eIBRS with unprivileged eBPF": V2Mode.EIBRS,
    "Vulnerable: eIBRS+LFENCE with unprivileged eBPF and SMT": V2Mode.EIBRS_LFENCE,
}
"""bugs.c spectre_v2_show_state() (6.1.192: bugs.c:3212-3217): lines printed instead of the usual ones, with no
other field (no BHI field either), while unprivileged eBPF is enabled. The mode is still the one named."""


@dataclass(frozen=True)
class SysfsSpectreV2:
    """What a spectre_v2 sysfs line says about the two choices pvmit cares about."""

    mode: V2Mode | None
    bhi: Bhi
    line: str


def parse_spectre_v2(line: str) -> SysfsSpectreV2:
    """Parse /sys/devices/system/cpu/vulnerabilities/spectre_v2. Unknown text gives mode None / Bhi.UNKNOWN."""
    line = line.strip()
    body = line.removesuffix(MODULE_SUFFIX)
    head, *fields = [p.strip() for p in body.split(";")]
    if ", " in head:  # kernels before v5.x separated every field with ", "
        head, *more = [p.strip() for p in head.split(", ")]
        fields = more + fields
    known = {s: m for m, s in MODE_STRINGS.items()} | _OLD_HEADS | WHOLE_LINES
    mode = known.get(head)
    if mode is None and (head == "Vulnerable" or head.startswith("Vulnerable,")):
        mode = V2Mode.NONE  # only the bare word: any other "Vulnerable: ..." is a mode pvmit does not know
    bhi = Bhi.NOT_REPORTED
    for f in fields:
        if f.startswith("BHI:"):
            text = f[len("BHI:"):].strip()
            bhi = next((b for b in Bhi if b.value == text), Bhi.UNKNOWN)
    return SysfsSpectreV2(mode, bhi, line)


class Its(Enum):
    """/sys/devices/system/cpu/vulnerabilities/indirect_target_selection (bugs.c its_strings[], since the ITS
    mitigation: 6.15, and 6.1.139 / 6.6.91 / 6.12.29)."""

    NOT_AFFECTED = "Not affected"
    VULNERABLE = "Vulnerable"
    VMEXIT_ONLY = "Mitigation: Vulnerable, KVM: Not affected"
    ALIGNED_THUNKS = "Mitigation: Aligned branch/return thunks"
    RETPOLINE_STUFF = "Mitigation: Retpolines, Stuffing RSB"
    ABSENT = "no indirect_target_selection file"  # a kernel from before the ITS mitigation
    UNKNOWN = "unknown"

    @property
    def sysfs(self) -> str | None:
        """The text the kernel prints, None where there is no file."""
        return None if self in (Its.ABSENT, Its.UNKNOWN) else self.value


def parse_its(line: str | None) -> Its:
    """Parse the indirect_target_selection line; None (no file) is Its.ABSENT, unknown text Its.UNKNOWN."""
    if line is None:
        return Its.ABSENT
    text = line.strip()
    return next((i for i in Its if i.sysfs == text), Its.UNKNOWN)
