"""The forcing policy: from (host facts, what the guest relies on, its CPU personality, operator settings) to the
IA32_SPEC_CTRL bits to force, each with a reason. Pure and deterministic.

Rules (RFC v3 vmx_set_msr, extended to unknown facts and operator settings):
  - a mitigation the guest relies on that is effective on this host forces nothing (forcing costs performance);
  - one that is ineffective forces its control (retpoline -> RRSBA_DIS_S, short BHB loop -> BHI_DIS_S) where the
    host has it, and is an exposure where it does not;
  - operator settings force a control on or off per VM and take precedence over the guest (like the
    KVM_CAP_FORCE_SPEC_CTRL proposal); forcing off a control the guest needs is an exposure marked as an override;
  - a guest that never reported is trusted, or assumed to rely on what its boot personality makes likely, as the
    operator chooses; either way a warning says when that leaves it unprotected.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import Finding, Mitigation, Need, control_available, need
from pvmit.interface.bhi import DEFAULT_POLICY, BhiPolicy, parse_policy
from pvmit.interface.spec_ctrl import guest_writable
from pvmit.linux.model import predict
from pvmit.x86.bits import SpecCtrl

Unreported = Literal["trust", "assume-worst"]
FORCEABLE = SpecCtrl.RRSBA_DIS_S | SpecCtrl.BHI_DIS_S | SpecCtrl.IBRS | SpecCtrl.STIBP | SpecCtrl.SSBD | \
    SpecCtrl.IPRED_DIS_U | SpecCtrl.IPRED_DIS_S | SpecCtrl.RRSBA_DIS_U | SpecCtrl.PSFD | SpecCtrl.DDPD_U


@dataclass(frozen=True)
class OperatorSettings:
    """Per-VM operator choices. force_on/force_off are IA32_SPEC_CTRL bit masks the guest cannot change."""

    force_on: int = 0
    force_off: int = 0
    unreported: Unreported = "assume-worst"
    bhi_policy: BhiPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        if not isinstance(self.bhi_policy, BhiPolicy):
            raise ValueError(f"bhi_policy must be a BhiPolicy, not {self.bhi_policy!r}")
        if self.force_on & self.force_off:
            both = "+".join(str(b.name) for b in SpecCtrl if b & self.force_on & self.force_off)
            raise ValueError(f"{both} cannot be forced both on and off")
        bad = (self.force_on | self.force_off) & ~int(FORCEABLE)
        if bad:
            raise ValueError(f"IA32_SPEC_CTRL bits {bad:#x} are not controls pvmit can force")
        if self.unreported not in ("trust", "assume-worst"):
            raise ValueError(f"unreported policy must be 'trust' or 'assume-worst', not {self.unreported!r}")

    @property
    def mask(self) -> int:
        return self.force_on | self.force_off

    def to_json(self) -> dict[str, object]:
        return {"force_on": [b.name for b in SpecCtrl if b & self.force_on],
                "force_off": [b.name for b in SpecCtrl if b & self.force_off], "unreported": self.unreported,
                "bhi_policy": self.bhi_policy.value}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> OperatorSettings:
        def bits(names: object) -> int:
            if not isinstance(names, list):
                raise ValueError(f"expected a list of IA32_SPEC_CTRL bit names, got {names!r}")
            try:
                return sum(int(SpecCtrl[str(n)]) for n in names)
            except KeyError as e:
                raise ValueError(f"IA32_SPEC_CTRL has no bit named {e.args[0]!r}") from None

        return cls(bits(doc.get("force_on", [])), bits(doc.get("force_off", [])),
                   str(doc.get("unreported", "assume-worst")),  # type: ignore[arg-type]
                   parse_policy(str(doc.get("bhi_policy", DEFAULT_POLICY.value))))


@dataclass(frozen=True, order=True)
class PartialSettings:
    """Operator settings as given in one row: a field that is None was not given there."""

    force_on: int | None = None
    force_off: int | None = None
    unreported: str | None = None

    def __post_init__(self) -> None:
        if self.force_on and self.force_off and self.force_on & self.force_off:
            both = "+".join(str(b.name) for b in SpecCtrl if b & self.force_on & self.force_off)
            raise ValueError(f"{both} cannot be forced both on and off")

    @property
    def given(self) -> bool:
        return (self.force_on, self.force_off, self.unreported) != (None, None, None)

    def over(self, carried: PartialSettings | OperatorSettings) -> OperatorSettings:
        """These (the destination's) settings over the ones that travel with the VM, field by field; a bit the
        destination forces one way is dropped from the VM's opposite field. Fields set nowhere take the defaults.
        The one rule for combining them: the migration destination and the fleet planner both use it."""
        on, off = self.force_on, self.force_off
        if on is None:
            on = (carried.force_on or 0) & ~(off or 0)
        if off is None:
            off = (carried.force_off or 0) & ~on
        unreported = self.unreported or carried.unreported or OperatorSettings().unreported
        policy = carried.bhi_policy if isinstance(carried, OperatorSettings) else DEFAULT_POLICY
        return OperatorSettings(on, off, unreported, policy)  # type: ignore[arg-type]

    def label(self) -> str:
        parts = []
        if self.force_on:
            parts.append("force_on " + "+".join(str(b.name) for b in SpecCtrl if b & self.force_on))
        if self.force_off:
            parts.append("force_off " + "+".join(str(b.name) for b in SpecCtrl if b & self.force_off))
        if self.unreported:
            parts.append(f"unreported {self.unreported}")
        return ", ".join(parts) or "-"

    def to_json(self) -> dict[str, object]:
        def names(m: int | None) -> list[str] | None:
            return None if m is None else [str(b.name) for b in SpecCtrl if b & m]
        return {"force_on": names(self.force_on), "force_off": names(self.force_off), "unreported": self.unreported}


class Why(Enum):
    GUEST = "guest report"
    ASSUMED = "assumed from the boot personality"
    OPERATOR = "operator setting"


@dataclass(frozen=True)
class Forced:
    """One IA32_SPEC_CTRL bit held by the VMM: its value, who asked, and whether this host really has it."""

    control: SpecCtrl
    on: bool
    why: Why
    reason: str
    in_hardware: bool

    def to_json(self) -> dict[str, object]:
        return {"control": self.control.name, "value": int(self.on), "why": self.why.value, "reason": self.reason,
                "exists_on_host": self.in_hardware}


@dataclass(frozen=True)
class Exposure:
    """A mitigation the guest relies on that is ineffective here and not made up for."""

    mitigation: Mitigation
    reason: str
    override: bool = False  # True when an operator setting caused it (taken and reported, not a refusal)

    def to_json(self) -> dict[str, object]:
        return {"mitigation": self.mitigation.value, "reason": self.reason, "operator_override": self.override}


@dataclass(frozen=True)
class Decision:
    """What the VMM forces for one vCPU on one host, and why."""

    relied: frozenset[Mitigation]
    reported: bool
    forced: tuple[Forced, ...] = ()
    exposures: tuple[Exposure, ...] = ()
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    assumed: tuple[str, ...] = field(default=())  # unknown facts that were taken conservatively
    by_design: tuple[Exposure, ...] = ()  # left to the guest by the BHI policy: reported, not refused

    @property
    def mask(self) -> int:
        return sum(int(f.control) for f in self.forced)

    @property
    def value(self) -> int:
        return sum(int(f.control) for f in self.forced if f.on)

    @property
    def safe(self) -> bool:
        """No exposure except one an operator override caused (those are reported, not refused)."""
        return all(e.override for e in self.exposures)

    def to_json(self) -> dict[str, object]:
        return {
            "relied_on": sorted(m.value for m in self.relied), "reported": self.reported,
            "forced": [f.to_json() for f in self.forced], "mask": self.mask, "value": self.value,
            "exposures": [e.to_json() for e in self.exposures], "safe": self.safe,
            "notes": list(self.notes), "warnings": list(self.warnings), "assumed_facts": list(self.assumed),
            "exposed_by_policy_design": [e.to_json() for e in self.by_design],
        }


def assumed_reliance(personality: CpuFacts) -> tuple[frozenset[Mitigation], str]:
    """What a guest that never reported most likely relies on, judged from what it was shown at boot.

    The worst plausible case for each mitigation: retpoline unless the personality shows eIBRS (a guest shown
    eIBRS uses it by default), the short BHB loop unless the personality shows BHI_CTRL or is not affected. This is
    the Linux default choice (`pvmit.linux.model.predict`) plus retpoline wherever eIBRS is not shown.
    """
    p = predict(personality)
    relied = set(p.relies_on)
    eibrs_shown = p.mode.value.startswith("eibrs")
    if not eibrs_shown:
        relied.add(Mitigation.RETPOLINE)
    names = ", ".join(sorted(m.value for m in relied)) or "nothing"
    return frozenset(relied), f"boot personality suggests {names} ({p.sysfs_mode}; {p.sysfs_bhi})"


def left_to_guest(m: Mitigation, policy: BhiPolicy) -> bool:
    """Does `policy` leave making up for `m` to the guest (the VMM forces nothing for it)? The short loop, under
    every BHI policy but force-bhi-dis-s."""
    return m is Mitigation.BHB_SHORT and not policy.forces_bhi_dis_s


def _policy_need(n: Need, policy: BhiPolicy) -> Need:
    """`n` as the VMM sees it under `policy`: a control the policy never forces cannot be forced."""
    if not left_to_guest(n.mitigation, policy) or not n.must_force:
        return n
    return Need(n.mitigation, n.effective, n.control,
                Finding(False, f"the BHI policy {policy.value} never forces {n.control.name}: the guest must run "
                               "the long BHB-clearing loop itself"))


def can_honour(host: CpuFacts, m: Mitigation, policy: BhiPolicy = DEFAULT_POLICY) -> tuple[bool, str]:
    """Can this host keep `m` effective for a guest: it is effective here, or its control exists here (and the BHI
    policy forces it)?"""
    n = _policy_need(need(host, m), policy)
    if not n.must_force:
        return True, n.effective.reason
    if n.can_force:
        return True, f"{n.control.name} can be forced: {n.available.reason}"
    return False, f"{m.title} is ineffective ({n.effective.reason}) and {n.available.reason}"


def supported_requests(hosts: Iterable[CpuFacts], policy: BhiPolicy = DEFAULT_POLICY) -> int:
    """MITIGATION_ENUM for a VM that may run on any of `hosts`: the mitigations every one of them can honour under
    the BHI `policy`."""
    bits = 0
    hosts = list(hosts)
    for m in Mitigation:
        if hosts and all(can_honour(h, m, policy)[0] for h in hosts):
            bits |= int(m.request_bit)
    return bits


def decide(host: CpuFacts, reported: frozenset[Mitigation] | None, personality: CpuFacts,
           settings: OperatorSettings = OperatorSettings()) -> Decision:
    """The controls to force for one vCPU. `reported` is None for a vCPU that has not reported (yet)."""
    notes: list[str] = []
    warnings: list[str] = []
    assumed: list[str] = []
    forced: dict[SpecCtrl, Forced] = {}
    exposures: list[Exposure] = []
    by_design: list[Exposure] = []
    policy = settings.bhi_policy

    relied: frozenset[Mitigation]
    if reported is None:
        guess, why_text = assumed_reliance(personality)
        if settings.unreported == "trust":
            relied, why = frozenset(), Why.ASSUMED
            at_risk = [m for m in sorted(guess, key=lambda x: x.value) if need(host, m).must_force]
            if at_risk:
                warnings.append(
                    "guest has not reported and the operator trusts it: nothing is forced, although "
                    + ", ".join(m.title for m in at_risk) + f" would be ineffective here ({why_text})")
        else:
            relied, why = guess, Why.ASSUMED
            notes.append(f"guest has not reported; assuming the worst: {why_text}")
    else:
        relied, why = reported, Why.GUEST

    for m in sorted(relied, key=lambda x: x.value):
        n = need(host, m)
        assumed.extend(n.assumed)
        if not n.must_force:
            notes.append(f"{m.title}: effective here, nothing forced ({n.effective.reason})")
            continue
        if left_to_guest(m, policy) and reported is None:
            # the policy trusts the guest to run the long loop; one that does not is exposed by that design
            by_design.append(Exposure(m, f"{m.title} is ineffective here ({n.effective.reason}); under the BHI "
                                         f"policy {policy.value} the guest must run the long loop itself and the VMM "
                                         f"forces nothing: a guest that still runs the short one is exposed"))
            warnings.append(f"BHI policy {policy.value}: nothing forced for the short BHB-clearing sequence; a guest "
                            "that runs it here is exposed by the policy's design")
            continue
        n = _policy_need(n, policy)
        if n.can_force:
            forced[n.control] = Forced(n.control, True, why,
                                       f"{m.title} is ineffective here ({n.effective.reason}); "
                                       f"{n.available.reason}", True)
        else:
            exposures.append(Exposure(m, f"{m.title} is ineffective here ({n.effective.reason}) and "
                                         f"{n.available.reason}"))

    for bit in SpecCtrl:
        if not bit & settings.mask:
            continue
        on = bool(bit & settings.force_on)
        if bit in (SpecCtrl.RRSBA_DIS_S, SpecCtrl.BHI_DIS_S):
            exists = control_available(host, bit).answer  # with the derivation's care for unknown facts
        else:
            exists = bool(guest_writable(host) & bit)  # enumerated by the host's CPUID
        previous = forced.get(bit)
        if previous is not None and previous.on and not on:
            m = next(x for x in Mitigation if x.control is bit)
            exposures.append(Exposure(m, f"the operator forces {bit.name} off, which {m.title} needs here: "
                                         f"{previous.reason}", override=True))
            warnings.append(f"operator setting forces {bit.name} off: the guest is left exposed ({m.title})")
        forced[bit] = Forced(bit, on, Why.OPERATOR, f"operator forces {bit.name} {'on' if on else 'off'}", exists)
        if on and not exists:
            warnings.append(f"operator forces {bit.name} on, but this host does not have it: modelled only")

    return Decision(frozenset(relied), reported is not None,
                    tuple(sorted(forced.values(), key=lambda f: int(f.control))), tuple(exposures),
                    tuple(notes), tuple(warnings), tuple(dict.fromkeys(assumed)), tuple(by_design))
