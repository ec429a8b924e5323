"""Which software mitigations the running kernel relies on, from what it printed. Pure.

The kernel's own sysfs line is the evidence: it names the spectre_v2 mode chosen at boot and, since the 2024 BHI
mitigation, whether the short BHB-clearing loop runs on system calls. The rules are those of the RFC's kernel
patch, kept once in `pvmit.linux.spectre_v2` (V2Mode.uses_retpoline, Bhi.uses_short_loop), so the agent reports
exactly what pvmit's model of the kernel predicts it would. Text the parser does not know is taken to mean the
mitigation is in use: reporting a mitigation the kernel does not use costs performance, missing one costs safety.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvmit.agent.wire import BHB_CLEAR_SEQ_S_USED, RETPOLINE_S_USED
from pvmit.linux.spectre_v2 import Bhi, Its, V2Mode, parse_its, parse_spectre_v2

CMDLINE_OPTIONS = ("mitigations", "spectre_v2", "nospectre_v2", "spectre_bhi", "retbleed", "spectre_v2_user",
                   "indirect_target_selection")
"""Kernel parameters that change the choices the line reports; quoted in the reasons."""


@dataclass(frozen=True)
class Reliance:
    """What the kernel relies on, with the evidence and anything assumed."""

    retpoline: bool
    bhb_short: bool
    mode: V2Mode | None
    bhi: Bhi
    reasons: tuple[str, ...]
    assumed: tuple[str, ...] = ()
    its: Its = Its.ABSENT

    @property
    def bits(self) -> int:
        """The request bits (MITIGATION_CTRL layout)."""
        return (RETPOLINE_S_USED if self.retpoline else 0) | (BHB_CLEAR_SEQ_S_USED if self.bhb_short else 0)

    @property
    def relies_on(self) -> list[str]:
        """The names pvmit uses for these mitigations (pvmit.derive.Mitigation values)."""
        return [n for n, used in (("bhb-short", self.bhb_short), ("retpoline", self.retpoline)) if used]

    def to_json(self) -> dict[str, object]:
        return {"relies_on": self.relies_on, "request_bits": hex(self.bits),
                "mode": self.mode.value if self.mode else None, "bhi": self.bhi.name, "its": self.its.name,
                "reasons": list(self.reasons), "assumed": list(self.assumed)}


def cmdline_options(cmdline: str) -> list[str]:
    """The words of a kernel command line that change the spectre_v2/BHI choice."""
    return [w for w in cmdline.split() if w.partition("=")[0] in CMDLINE_OPTIONS]


def _its_reason(its: Its) -> str:
    if its is Its.ABSENT:
        return "indirect_target_selection: no such file (a kernel before the ITS mitigation)"
    if its is Its.UNKNOWN:
        return "indirect_target_selection: text pvmit does not know (reported as is)"
    return f"indirect_target_selection: {its.value}" + (
        " (an Intel guest says so only when shown ITS_NO or BHI_CTRL, which must then stay true on every host it "
        "may run on)" if its is Its.NOT_AFFECTED else "")


def decide(spectre_v2: str, cmdline: str = "", its_line: str | None = None) -> Reliance:
    """The request bits for a kernel that printed `spectre_v2` (its sysfs line) and booted with `cmdline`;
    `its_line` (indirect_target_selection, None where the file is missing) is reported, not requested: the
    interface has no ITS bit."""
    line = spectre_v2.strip()
    its = parse_its(its_line)
    opts = cmdline_options(cmdline)
    why = [f"command line: {' '.join(opts)}" if opts else "command line: no spectre options (the kernel chose)"]
    if line.startswith("Not affected"):
        why += ["spectre_v2: Not affected: no software mitigation in use", _its_reason(its)]
        return Reliance(False, False, None, Bhi.NOT_AFFECTED, tuple(why), its=its)
    seen = parse_spectre_v2(line)
    assumed: list[str] = []
    head = line.split(";")[0].strip()
    if seen.mode is None:
        retpoline = True
        assumed.append("retpoline")
        why.append(f"spectre_v2 {head!r} is not a mode pvmit knows: assumed retpoline, which protects the guest")
    else:
        retpoline = seen.mode.uses_retpoline
        why.append(f"spectre_v2 {head!r}: mode {seen.mode.value}, "
                   + ("retpoline in use" if retpoline else "no retpoline"))
    if seen.bhi is Bhi.UNKNOWN:
        bhb = True
        assumed.append("bhb-short")
        why.append("BHI field not understood: assumed the short BHB-clearing loop, which protects the guest")
    elif seen.bhi is Bhi.NOT_REPORTED:
        # Either a kernel from before the 2024 BHI mitigation (no loop), or a line that leaves the field out while
        # the loop may run: "Vulnerable: eIBRS with unprivileged eBPF" (bugs.c:3213 in 6.1.192, whose
        # bhi_select_mitigation() still sets CLEAR_BHB_LOOP, bugs.c:1815), "Vulnerable: LFENCE" on 6.9-era kernels.
        bhb = True
        assumed.append("bhb-short")
        why.append("no BHI field: a kernel from before the 2024 BHI mitigation, or a line that leaves it out while "
                   "the loop may run: assumed the short BHB-clearing loop, which protects the guest")
    else:
        bhb = seen.bhi.uses_short_loop
        why.append(f"BHI: {seen.bhi.value}: " + (
            "the short BHB-clearing loop runs on system calls" if bhb else
            "the loop runs only on VM exit (for the guest's own guests), not on system calls"
            if seen.bhi in (Bhi.VMEXIT_ONLY, Bhi.SYSCALL_HARDENING) else "no short BHB-clearing loop on system calls"))
    why.append(_its_reason(its))
    return Reliance(retpoline, bhb, seen.mode, seen.bhi, tuple(why), tuple(assumed), its)
