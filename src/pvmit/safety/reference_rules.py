"""A second, independent statement of pvmit's derivation rules, as tables, for `pvmit verify` and the tests to
check `pvmit.derive` against.

`pvmit.derive` is written as code: conditions in order, each with a reason. This module states the same rules as
data, written again from the sources (Linux arch/x86/kernel/cpu/bugs.c and common.c, Xen xen/arch/x86/spec_ctrl.c,
the RFC v3 series, the public LKML thread on non-RRSBA parts) and shares no code with derive: it reads the raw
register bits itself, by the bit numbers the SDM and Linux's msr-index.h give, and imports nothing from derive, the
x86 bit layouts or the policy. A disagreement between the two is a bug in one of them, and `pvmit verify` reports it
as a violation with both answers.

Each deciding fact is first read as "1", "0" or "?" (unknown). A fact the catalog only infers (a rule for a class
of parts, not a reading of this one) counts only where it points the way that keeps a guest protected; pointing the
other way it is read as "?" (TRUST below). Then each question has an ordered table: the first row that matches
answers ("*" matches anything), and every table ends in rows that together match every input, so no combination is
left out (`check_tables` proves it by enumeration).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from pvmit.catalog.facts import CpuFacts

# --- the deciding bits, by number ------------------------------------------------------------------------------
# Linux arch/x86/include/asm/msr-index.h (ARCH_CAP_*) and arch/x86/kernel/cpu/scattered.c (CPUID.(7,2).EDX).
BITS: dict[str, tuple[str, int]] = {
    "EIBRS": ("arch_capabilities", 1),        # ARCH_CAP_IBRS_ALL BIT(1)
    "RSBA": ("arch_capabilities", 2),         # ARCH_CAP_RSBA BIT(2)
    "RRSBA": ("arch_capabilities", 19),       # ARCH_CAP_RRSBA BIT(19)
    "BHI_NO": ("arch_capabilities", 20),      # ARCH_CAP_BHI_NO BIT(20)
    "RRSBA_CTRL": ("cpuid_7_2_edx", 2),       # X86_FEATURE_RRSBA_CTRL: CPUID.(7,2).EDX bit 2
    "BHI_CTRL": ("cpuid_7_2_edx", 4),         # X86_FEATURE_BHI_CTRL: CPUID.(7,2).EDX bit 4
    "RETBLEED": ("linux_blacklist", 3),       # common.c: #define RETBLEED BIT(3), the part's cpu_vuln_blacklist flag
}

# --- which inferred values count, per use ----------------------------------------------------------------------
# (question, fact) -> the inferred value that counts; an inferred fact with the other value reads "?". An empty
# string: an inferred value never counts (either answer could expose the guest).
TRUST: dict[tuple[str, str], str] = {
    ("retpoline", "RRSBA"): "1",        # RRSBA=1 makes retpoline ineffective: protective
    ("retpoline", "RSBA"): "1",         # likewise RSBA=1
    ("retpoline", "RETBLEED"): "1",     # listed RETBLEED-affected: protective
    ("retpoline", "EIBRS"): "",         # eIBRS=1 sends the question to RRSBA, =0 to RSBA: neither side is safe
    ("bhb-short", "BHI_NO"): "0",       # BHI_NO=1 would call the short loop enough: not protective
    ("bhb-short", "BHI_CTRL"): "1",     # BHI_CTRL=1 makes the short loop ineffective: protective
    ("control", "RRSBA_CTRL"): "0",     # a control that exists is what lets a guest be accepted: 1 is not protective
    ("control", "BHI_CTRL"): "0",
}

Rule = tuple[tuple[str, ...], bool, tuple[str, ...], str]
"""(pattern, answer, assumed, source): the pattern has one entry per column ("1", "0", "?", a vendor, or "*");
`assumed` names the facts an answer taken for want of knowledge rests on (those of them that are unknown are the
ones the answer must name as assumed); empty when the answer rests on known facts only."""

ALL4 = ("EIBRS", "RRSBA", "RSBA", "RETBLEED")

RETPOLINE_COLUMNS = ("vendor", "RRSBA", "RSBA", "EIBRS", "RETBLEED")
RETPOLINE: tuple[Rule, ...] = (
    (("amd", "*", "*", "*", "*"), True, (),
     "Xen spec_ctrl.c retpoline_calculations(): AMD/Hygon return true (RSBA/RRSBA are Intel behaviours)"),
    (("hygon", "*", "*", "*", "*"), True, (), "Xen spec_ctrl.c retpoline_calculations(): AMD/Hygon return true"),
    (("intel", "1", "*", "*", "*"), False, (),
     "Linux bugs.c spec_ctrl_disable_kernel_rrsba(): retpoline modes need RRSBA_DIS_S where ARCH_CAP_RRSBA is set"),
    (("intel", "*", "1", "*", "*"), False, (),
     "Xen spec_ctrl.c retpoline_calculations(): 'if ( cpu_has_rsba ) return false'; Linux common.c "
     "cpu_set_bug_bits(): ARCH_CAP_RSBA sets X86_BUG_RETBLEED"),
    (("intel", "*", "*", "*", "1"), False, (),
     "Linux common.c cpu_set_bug_bits(): a cpu_vuln_blacklist RETBLEED part gets X86_BUG_RETBLEED; bugs.c "
     "RETBLEED_INTEL_MSG: a retpoline kernel there 'leaves CPU vulnerable to RETBleed attacks'"),
    (("intel", "*", "*", "?", "*"), False, ALL4, "unknown eIBRS: the guest-protecting answer"),
    (("intel", "?", "*", "1", "*"), False, ("RRSBA", "RETBLEED"),
     "Xen spec_ctrl.c retpoline_calculations(): eIBRS parts are not guaranteed retpoline-safe; before the August "
     "2023 microcode many did not enumerate RRSBA"),
    (("intel", "0", "*", "1", "?"), False, ("RETBLEED",), "unknown RETBLEED listing: the guest-protecting answer"),
    (("intel", "0", "*", "1", "0"), True, (),
     "LKML 2024-04-11 (A. Cooper): ICX, TGL are non-RRSBA; an eIBRS part that enumerates RRSBA=0 and that Linux "
     "does not list as RETBLEED-affected is believed"),
    (("intel", "*", "?", "0", "*"), False, ("RSBA", "RETBLEED"),
     "Xen spec_ctrl.c retpoline_calculations(): without ARCH_CAPS, unrecognised models are 'not retpoline safe'"),
    (("intel", "*", "0", "0", "?"), False, ("RETBLEED",), "unknown RETBLEED listing: the guest-protecting answer"),
    (("intel", "*", "0", "0", "0"), True, (),
     "Xen spec_ctrl.c retpoline_calculations(): 'If ARCH_CAPS is visible, trust the absence of RSBA || RRSBA'"),
)

BHB_COLUMNS = ("vendor", "BHI_NO", "BHI_CTRL")
BHB_SHORT: tuple[Rule, ...] = (
    (("amd", "*", "*"), True, (), "Linux common.c cpu_vuln_whitelist: AMD carries NO_BHI"),
    (("hygon", "*", "*"), True, (), "Linux common.c cpu_vuln_whitelist: Hygon carries NO_BHI"),
    (("intel", "1", "*"), True, (),
     "Xen spec_ctrl.c cpu_has_bug_bhi(): BHI_NO returns false; Linux bugs.c spec_ctrl_bhi_dis(): with BHI_NO "
     "'BHI protections are always enabled anyway'"),
    (("intel", "*", "1"), False, (),
     "Linux entry_64.S clear_bhb_loop: the short (5x5) loop is for parts before Alder Lake, BHI_CTRL parts need "
     "the long one (bugs.c picks it with X86_FEATURE_BHI_CTRL); RFC v3 cover letter: ineffective on SPR and later"),
    (("intel", "*", "?"), False, ("BHI_CTRL",), "unknown BHI_CTRL: the guest-protecting answer"),
    (("intel", "*", "0"), True, (), "no BHI_CTRL: pre-Alder Lake branch history, which the 5x5 loop clears"),
)

CONTROL_COLUMNS = ("vendor", "ENUM")
CONTROL: tuple[Rule, ...] = (
    (("amd", "*"), False, (), "RRSBA_DIS_S and BHI_DIS_S are Intel IA32_SPEC_CTRL bits"),
    (("hygon", "*"), False, (), "RRSBA_DIS_S and BHI_DIS_S are Intel IA32_SPEC_CTRL bits"),
    (("intel", "1"), True, (),
     "Linux bugs.c spec_ctrl_disable_kernel_rrsba() / spec_ctrl_bhi_dis(): the bit is set only with "
     "X86_FEATURE_RRSBA_CTRL / X86_FEATURE_BHI_CTRL; Xen bhi_calculations() likewise"),
    (("intel", "0"), False, (), "not enumerated in CPUID.(7,2).EDX"),
    (("intel", "?"), False, ("ENUM",), "unknown enumeration: assumed absent"),
)

# Which control makes up for which mitigation, and which CPUID bit enumerates it (RFC v3 vmx_set_msr:
# RETPOLINE_S_USED -> RRSBA_DIS_S, BHB_CLEAR_SEQ_S_USED -> BHI_DIS_S).
COMPENSATES = {"retpoline": ("RRSBA_DIS_S", "RRSBA_CTRL"), "bhb-short": ("BHI_DIS_S", "BHI_CTRL")}
RSBA_NOT_COVERED = ("Intel's RRSBA_DIS_S disables RRSBA behaviour only; Linux bugs.c spec_ctrl_disable_kernel_rrsba() "
                    "sets it only with ARCH_CAP_RRSBA: a part with RSBA, or listed RETBLEED-affected, and no RRSBA has "
                    "no control for retpoline")


@dataclass(frozen=True)
class Expected:
    """What the reference rules say about one mitigation on one CPU."""

    mitigation: str
    effective: bool
    control: str
    control_exists: bool
    can_force: bool
    effective_assumed: tuple[str, ...]  # unknown facts the answer on effectiveness was taken for ("register.BIT")
    control_assumed: tuple[str, ...]  # likewise for the control's existence
    why: tuple[str, ...]  # the rows (their sources) that decided

    @property
    def assumed(self) -> bool:
        return bool(self.effective_assumed or self.control_assumed)


CATALOG_NAMES = {"EIBRS": "IBRS_ALL"}  # the catalog's name of a bit where it differs from the one used here


def named(facts: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{BITS[f][0]}.{CATALOG_NAMES.get(f, f)}" for f in facts)


def read(cpu: CpuFacts, question: str, fact: str) -> str:
    """One deciding fact as "1", "0" or "?", with the TRUST rule for inferred facts applied."""
    register, bit = BITS[fact]
    rf = cpu.registers.get(register)
    mask = 1 << bit
    if rf is None or not rf.known & mask:
        return "?"
    value = "1" if rf.value & mask else "0"
    if rf.inferred & mask and value != TRUST[(question, fact)]:
        return "?"
    return value


def first_match(table: tuple[Rule, ...], key: tuple[str, ...]) -> Rule:
    for rule in table:
        if all(p in ("*", k) for p, k in zip(rule[0], key, strict=True)):
            return rule
    raise LookupError(f"no rule matches {key}")


def control_exists(cpu: CpuFacts, enum_fact: str) -> tuple[bool, tuple[str, ...], str]:
    rule = first_match(CONTROL, (cpu.vendor, read(cpu, "control", enum_fact)))
    return rule[1], named((enum_fact,) if rule[2] else ()), rule[3]


def expected(cpu: CpuFacts, mitigation: str) -> Expected:
    """The reference answer for `mitigation` ("retpoline" or "bhb-short") on `cpu`."""
    control, enum_fact = COMPENSATES[mitigation]
    table, columns = (RETPOLINE, RETPOLINE_COLUMNS) if mitigation == "retpoline" else (BHB_SHORT, BHB_COLUMNS)
    eff_rule = first_match(table, (cpu.vendor, *(read(cpu, mitigation, f) for f in columns[1:])))
    eff_assumed = named(tuple(f for f in eff_rule[2] if read(cpu, mitigation, f) == "?"))
    exists, ctl_assumed, ctl_why = control_exists(cpu, enum_fact)
    can_force, force_why = exists, ctl_why
    if mitigation == "retpoline" and not eff_rule[1] and read(cpu, "retpoline", "RRSBA") != "1" and \
            "1" in (read(cpu, "retpoline", "RSBA"), read(cpu, "retpoline", "RETBLEED")):
        can_force, force_why = False, RSBA_NOT_COVERED
    return Expected(mitigation, eff_rule[1], control, exists, can_force, eff_assumed, ctl_assumed,
                    (eff_rule[3], force_why))


# --- synthetic facts: every combination of the deciding bits ----------------------------------------------------
STATES = ("unknown", "0", "1", "0 inferred", "1 inferred")


def synthetic(vendors: tuple[str, ...] = ("intel", "amd", "hygon"), *,
              inferred: bool = True) -> Iterator[tuple[str, CpuFacts]]:
    """(label, facts) for every vendor and every state of every deciding bit: on Intel known 0/1, inferred 0/1 and
    unknown (5^7 = 78,125 combinations); elsewhere, where no bit decides anything, known 0/1 and unknown (3^7).
    Only the deciding bits are described; everything else is unknown. `inferred=False`: known and unknown only."""
    from pvmit.catalog.facts import RegisterFacts
    from pvmit.x86.registers import REGISTERS

    names = list(BITS)
    for vendor in vendors:
        for states in itertools.product(range(len(STATES) if vendor == "intel" and inferred else 3),
                                        repeat=len(names)):
            regs: dict[str, list[int]] = {}
            for name, s in zip(names, states, strict=True):
                register, bit = BITS[name]
                value, known, guessed = regs.setdefault(register, [0, 0, 0])
                if s:
                    known |= 1 << bit
                    value |= (1 << bit) if s in (2, 4) else 0
                    guessed |= (1 << bit) if s in (3, 4) else 0
                regs[register] = [value, known, guessed]
            facts = CpuFacts(vendor, 6, 0, None, {  # type: ignore[arg-type]
                k: RegisterFacts(REGISTERS[k], v, kn, {"*": "synthetic"}, "synthetic: unknown", inf)
                for k, (v, kn, inf) in regs.items()})
            label = f"synthetic {vendor} " + " ".join(f"{n}={STATES[s]}" for n, s in zip(names, states, strict=True))
            yield label, facts


def check_tables() -> list[str]:
    """Every table answers every combination of its columns (a row always matches), and no row is dead (each
    decides at least one combination). Returns the problems found."""
    problems = []
    values = ("1", "0", "?")
    for name, table, columns in (("RETPOLINE", RETPOLINE, RETPOLINE_COLUMNS), ("BHB_SHORT", BHB_SHORT, BHB_COLUMNS),
                                 ("CONTROL", CONTROL, CONTROL_COLUMNS)):
        used: set[int] = set()
        for key in itertools.product(("intel", "amd", "hygon"), *[values] * (len(columns) - 1)):
            try:
                used.add(table.index(first_match(table, key)))
            except LookupError as e:
                problems.append(f"{name}: {e}")
        problems += [f"{name}: row {i} {table[i][0]} never decides" for i in range(len(table)) if i not in used]
    return problems
