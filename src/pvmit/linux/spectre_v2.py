"""Linux's spectre_v2 modes and BHI mitigations, the strings it prints for them in sysfs, and parsing those strings.

Standard library only: the guest agent (`pvmit.agent`) runs this inside small guests.
Strings follow arch/x86/kernel/cpu/bugs.c (spectre_v2_strings[], spectre_bhi_state()); older kernels print
"Enhanced IBRS" where current ones print "Enhanced / Automatic IBRS", and the parser accepts both.
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
    SYSCALL_HARDENING = "Syscall hardening, KVM: SW loop"  # 6.9-era kernels
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
    "Mitigation: Enhanced IBRS": V2Mode.EIBRS,  # before AutoIBRS support (v6.3)
    "Mitigation: Enhanced IBRS + LFENCE": V2Mode.EIBRS_LFENCE,
    "Mitigation: Enhanced IBRS + Retpolines": V2Mode.EIBRS_RETPOLINE,
    "Mitigation: Full generic retpoline": V2Mode.RETPOLINE,  # before v5.17
    "Mitigation: Full AMD retpoline": V2Mode.LFENCE,
    "Mitigation: LFENCE": V2Mode.LFENCE,  # before 2025 (bugs.c d1cc1bae)
}

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
    head, *fields = [p.strip() for p in line.split(";")]
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
