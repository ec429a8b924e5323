"""What a CPU's facts mean for the software mitigations a guest kernel may rely on. Pure functions, no I/O.

For each CPU (a catalog model or a live host) pvmit decides:
  (a) whether retpoline is an effective Spectre v2 mitigation in the kernel there,
  (b) whether the short BHB-clearing sequence is effective against BHI there,
  (c) which IA32_SPEC_CTRL controls exist there to make up for an ineffective one,
  (d) which spectre_v2 mode, with which BHI mitigation, a current Linux guest kernel picks when shown that CPU
      (see `pvmit.linux.model`).
Every answer carries a one-line reason citing the facts it used. A fact that is unknown, or only inferred and
pointing the unsafe way, is assumed in the direction that protects the guest (a mitigation is assumed ineffective,
a control absent), and the answer says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from pvmit.catalog.facts import CpuFacts, Fact
from pvmit.x86.bits import MitigationCtrl, SpecCtrl


class Mitigation(Enum):
    """The software mitigations a guest can report, one per MITIGATION_CTRL bit (RFC v3)."""

    RETPOLINE = "retpoline"
    BHB_SHORT = "bhb-short"

    @property
    def request_bit(self) -> MitigationCtrl:
        return _REQUEST_BIT[self]

    @property
    def control(self) -> SpecCtrl:
        """The IA32_SPEC_CTRL bit that makes up for this mitigation where it is ineffective (RFC v3 vmx_set_msr)."""
        return _CONTROL[self]

    @property
    def title(self) -> str:
        return {Mitigation.RETPOLINE: "retpoline", Mitigation.BHB_SHORT: "short BHB-clearing sequence"}[self]


_REQUEST_BIT = {
    Mitigation.RETPOLINE: MitigationCtrl.RETPOLINE_S_USED,
    Mitigation.BHB_SHORT: MitigationCtrl.BHB_CLEAR_SEQ_S_USED,
}
_CONTROL = {Mitigation.RETPOLINE: SpecCtrl.RRSBA_DIS_S, Mitigation.BHB_SHORT: SpecCtrl.BHI_DIS_S}
_ALL_REQUEST_BITS = sum(int(b) for b in _REQUEST_BIT.values())
_FROM_BITS = {v: frozenset(m for m, b in _REQUEST_BIT.items() if v & int(b)) for v in range(_ALL_REQUEST_BITS + 1)}
"""Every subset of request bits -> its mitigations, computed once (this runs inside a migration's downtime)."""


def mitigations_from_bits(value: int) -> frozenset[Mitigation]:
    """The mitigations named by request bits (MITIGATION_CTRL layout); other bits are ignored."""
    return _FROM_BITS[value & _ALL_REQUEST_BITS]


def mitigations_to_bits(ms: frozenset[Mitigation] | set[Mitigation]) -> int:
    return sum(int(m.request_bit) for m in ms)


@dataclass(frozen=True)
class Finding:
    """A yes/no answer with its one-line reason; `assumed` lists unknown facts that were taken conservatively."""

    answer: bool
    reason: str
    assumed: tuple[str, ...] = ()

    @property
    def conservative(self) -> bool:
        return bool(self.assumed)

    def to_json(self) -> dict[str, object]:
        return {"answer": self.answer, "reason": self.reason, "assumed": list(self.assumed)}


def _sure(f: Fact, protects: bool) -> Fact:
    """`f`, or `f` made unknown when it is inferred and points away from `protects` (see Fact.sure)."""
    if f.sure(protects) is None and f.known:
        return Fact(f.register, f.bit, None, f"only inferred ({f.source}), not relied on in this direction")
    return f


def _assumed(*facts: Fact) -> tuple[str, ...]:
    return tuple(f"{f.register}.{f.bit}" for f in facts if not f.known)


def retpoline_effective(cpu: CpuFacts) -> Finding:
    """(a) Is retpoline an effective Spectre v2 mitigation for the kernel on this CPU?

    Retpoline turns indirect branches into RETs whose prediction comes from the RSB. It fails where RET can fall
    back to the BTB when the RSB underflows: RSBA (Skylake-generation parts), RRSBA (eIBRS parts; Xen's
    retpoline_calculations: "All eIBRS-capable processors suffer RSBA ... when eIBRS is active, RSBA becomes RRSBA"),
    and every part Linux lists as RETBLEED-affected (common.c cpu_vuln_blacklist; Linux sets X86_BUG_RETBLEED for
    those and for RSBA), whatever RRSBA says: on those Linux warns "Spectre v2 mitigation leaves CPU vulnerable to
    RETBleed attacks" when the kernel uses retpoline (bugs.c RETBLEED_INTEL_MSG). Rocket Lake is such a part although
    it does not have RRSBA (Cooper, 2024).
    """
    if cpu.vendor != "intel":
        return Finding(
            True,
            f"no RSBA/RRSBA on {cpu.vendor.upper()} (Intel behaviours, enumerated in the Intel-only "
            "IA32_ARCH_CAPABILITIES); RET speculation there (Branch Type Confusion on Zen 1/2, SRSO) is handled by "
            "Linux's separate retbleed/SRSO mitigations (untrained return thunk, IBPB), which it deploys whatever "
            "the spectre_v2 mode and which this interface does not cover",
        )
    rrsba = _sure(cpu.fact("arch_capabilities", "RRSBA"), protects=True)
    rsba = _sure(cpu.fact("arch_capabilities", "RSBA"), protects=True)
    retbleed = _sure(cpu.fact("linux_blacklist", "RETBLEED"), protects=True)
    eibrs = cpu.fact("arch_capabilities", "IBRS_ALL")
    if eibrs.inferred:
        eibrs = Fact(eibrs.register, eibrs.bit, None, f"only inferred ({eibrs.source})")
    if rrsba.value:
        return Finding(False, f"RET may predict from the BTB on RSB underflow: {rrsba.cite()}")
    if rsba.value:
        return Finding(False, f"RET may predict from the BTB on RSB underflow (Retbleed): {rsba.cite()}")
    if retbleed.value:
        return Finding(False, f"Linux lists this part as RETBLEED-affected, so RET may predict from the BTB whatever "
                              f"RRSBA says: {retbleed.cite()}")
    if eibrs.value is None:
        return Finding(False, f"assumed ineffective: {eibrs.cite()}, {rrsba.cite()}",
                       _assumed(eibrs, rrsba, rsba, retbleed))
    if eibrs.value:
        # On eIBRS parts RSBA shows up as RRSBA (Xen retpoline_calculations), so RRSBA alone decides.
        if rrsba.value is None:
            return Finding(False, f"assumed ineffective: {rrsba.cite()}; eIBRS parts have RRSBA behaviour unless "
                                  f"shown otherwise ({eibrs.cite()})", _assumed(rrsba, retbleed))
        if retbleed.value is None:
            return Finding(False, f"assumed ineffective: {retbleed.cite()} (a RETBLEED-affected part is not "
                                  f"retpoline-safe whatever RRSBA says)", _assumed(retbleed))
        return Finding(True, f"eIBRS part without RRSBA behaviour, not RETBLEED-affected: {rrsba.cite()}, "
                             f"{eibrs.cite()}, {retbleed.cite()}")
    if rsba.value is None:
        return Finding(False, f"assumed ineffective: {rsba.cite()} on a part without eIBRS", _assumed(rsba, retbleed))
    if retbleed.value is None:
        return Finding(False, f"assumed ineffective: {retbleed.cite()} (a RETBLEED-affected part is not "
                              f"retpoline-safe)", _assumed(retbleed))
    return Finding(True, f"no RSB-underflow fallback to the BTB: {rsba.cite()}, {eibrs.cite()}, {retbleed.cite()}")


def bhb_short_effective(cpu: CpuFacts) -> Finding:
    """(b) Is the short BHB-clearing sequence (Linux clear_bhb_loop, 5x5) effective against BHI on this CPU?

    Linux entry_64.S: the loop "should be used on parts prior to Alder Lake"; the RFC v3 cover letter: effective on
    pre-SPR parts but not on SPR and later. The parts with the longer history are those that enumerate BHI_CTRL,
    which is also how Linux picks the long (12/7) loop. BHI_NO parts are not affected.
    """
    if cpu.vendor != "intel":
        return Finding(True, f"{cpu.vendor.upper()} is on Linux's NO_BHI list (common.c): not affected by BHI")
    bhi_no = _sure(cpu.fact("arch_capabilities", "BHI_NO"), protects=False)
    bhi_ctrl = _sure(cpu.fact("cpuid_7_2_edx", "BHI_CTRL"), protects=True)
    if bhi_no.value:
        return Finding(True, f"not affected by cross-mode BHI: {bhi_no.cite()}")
    if bhi_ctrl.value:
        return Finding(False, f"branch history longer than the 5x5 loop clears (Alder Lake and newer): "
                              f"{bhi_ctrl.cite()}")
    if bhi_ctrl.value is None:
        return Finding(False, f"assumed ineffective: {bhi_ctrl.cite()}", _assumed(bhi_ctrl))
    return Finding(True, f"pre-Alder Lake branch history, which the 5x5 loop clears: {bhi_ctrl.cite()}")


def control_available(cpu: CpuFacts, control: SpecCtrl) -> Finding:
    """(c) Does this CPU have the IA32_SPEC_CTRL control? RRSBA_DIS_S needs RRSBA_CTRL, BHI_DIS_S needs BHI_CTRL."""
    enum_bit = {SpecCtrl.RRSBA_DIS_S: "RRSBA_CTRL", SpecCtrl.BHI_DIS_S: "BHI_CTRL"}.get(control)
    if enum_bit is None:
        raise ValueError(f"pvmit does not force {control!r}")
    if cpu.vendor != "intel":
        return Finding(False, f"{control.name} is an Intel control; {cpu.vendor.upper()} CPUs do not have it")
    f = _sure(cpu.fact("cpuid_7_2_edx", enum_bit), protects=False)
    if f.value is None:
        return Finding(False, f"assumed absent: {f.cite()}", _assumed(f))
    return Finding(bool(f.value), f"{control.name} {'exists' if f.value else 'does not exist'}: {f.cite()}")


@dataclass(frozen=True)
class Need:
    """What one reported mitigation needs on one CPU."""

    mitigation: Mitigation
    effective: Finding
    control: SpecCtrl
    available: Finding

    @property
    def must_force(self) -> bool:
        return not self.effective.answer

    @property
    def can_force(self) -> bool:
        return self.available.answer

    @property
    def assumed(self) -> tuple[str, ...]:
        return self.effective.assumed + self.available.assumed


def need(cpu: CpuFacts, m: Mitigation) -> Need:
    """Whether `m` is effective on `cpu` and, if not, whether its compensating control exists there."""
    eff = retpoline_effective(cpu) if m is Mitigation.RETPOLINE else bhb_short_effective(cpu)
    avail = control_available(cpu, m.control)
    if m is Mitigation.RETPOLINE and not eff.answer and not cpu.fact("arch_capabilities", "RRSBA").value:
        # RRSBA_DIS_S disables RRSBA behaviour only: a part that is not retpoline-safe for another reason (RSBA, or
        # Linux's RETBLEED listing, which Linux sets alongside RSBA) has no IA32_SPEC_CTRL control that fixes it.
        if cpu.fact("arch_capabilities", "RSBA").value:
            avail = Finding(False, "RSBA (pre-eIBRS) has no IA32_SPEC_CTRL disable; RRSBA_DIS_S covers RRSBA only")
        elif cpu.fact("linux_blacklist", "RETBLEED").value:
            avail = Finding(False, "no IA32_SPEC_CTRL control makes retpoline safe on a RETBLEED-affected part "
                                   "without RRSBA; RRSBA_DIS_S covers RRSBA only")
    return Need(m, eff, m.control, avail)


def cpu_summary(cpu: CpuFacts) -> dict[str, Any]:
    """(a)-(c) for one CPU, as JSON-ready data."""
    return {
        "retpoline_effective": retpoline_effective(cpu).to_json(),
        "bhb_short_effective": bhb_short_effective(cpu).to_json(),
        "controls": {c.name: control_available(cpu, c).to_json() for c in (SpecCtrl.RRSBA_DIS_S, SpecCtrl.BHI_DIS_S)},
    }
