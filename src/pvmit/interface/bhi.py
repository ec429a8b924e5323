"""The four answers to BHI in a pool that spans Alder Lake, as policies a VMM can run. Pure.

Linux clears branch history on kernel entry with `clear_bhb_loop`: 5 x 5 iterations, which does not clear the longer
history of Alder Lake and newer parts; the VMSCAPE/BHB series (v11, <20260422-vmscape-bhb-v11-0-b18e0cf32af4@
linux.intel.com>, patch 2) picks 12 x 7 "on newer CPUs (with BHI_CTRL support)". A pool that spans Alder Lake cannot
show its guests BHI_CTRL, so a guest cannot tell it needs the long loop (Jim Mattson, <CALMp9eQNBZsJNdfCVwbJ4v1DgCN
qRV3DVcEeCPFt=dd29+qy-A@mail.gmail.com>). The answers argued on LKML, each one policy here (docs/bhi.md):

  long-under-hypervisor  (a) the guest runs the long loop whenever it runs under a hypervisor (Jim Mattson,
                         <CALMp9eSPkMpKQELTnsaj6=gXD+EyE0n2_p93n4maDc93bPFe+w@mail.gmail.com>);
  cmdline-long           (b) the operator boots the guest with `spectre_bhi=long` (Pawan Gupta,
                         <20260403185236.sjgetnkha3o3a4d3@desk>);
  long-needed-bit        (c) the hypervisor shows a bit meaning "long BHB sequence needed", set only by hypervisors,
                         like ARCH_CAP SKIP_L1DFL_VMENTRY (Jim Mattson, same message as (a)); pvmit's registers for
                         it are in docs/interface.md section 9;
  force-bhi-dis-s        (d) the VMM sets BHI_DIS_S behind a guest that runs the short loop where it is too short
                         (Intel's guidance; Jim Mattson, <CALMp9eQoE13d1cqD3PNJtvdKUGZeVm1g-9TWh+M+MJj_sm9CzA@
                         mail.gmail.com>); what pvmit did before the policies existed, and its default.

Only (d) has the VMM force BHI_DIS_S. Under (a)-(c) the guest is trusted to clear the longer history itself: the VMM
promises the short loop (MITIGATION_ENUM bit 0) only where it is effective without help, and a guest that does not
follow the policy is exposed on the hosts with the longer history by the policy's design (reported, never refused).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import bhb_short_effective


class BhiPolicy(Enum):
    LONG_UNDER_HYPERVISOR = "long-under-hypervisor"
    CMDLINE_LONG = "cmdline-long"
    LONG_NEEDED_BIT = "long-needed-bit"
    FORCE_BHI_DIS_S = "force-bhi-dis-s"

    @property
    def letter(self) -> str:
        return _LETTER[self]

    @property
    def forces_bhi_dis_s(self) -> bool:
        """Does the VMM make up for the short loop with BHI_DIS_S? Only under (d)."""
        return self is BhiPolicy.FORCE_BHI_DIS_S

    @property
    def shows_long_bit(self) -> bool:
        """Does the VMM show the LONG_BHB_NEEDED bit? Only under (c)."""
        return self is BhiPolicy.LONG_NEEDED_BIT

    @property
    def definition(self) -> PolicyText:
        return _TEXT[self]


DEFAULT_POLICY = BhiPolicy.FORCE_BHI_DIS_S
POLICY_NAMES = tuple(p.value for p in BhiPolicy)

_LETTER = {BhiPolicy.LONG_UNDER_HYPERVISOR: "a", BhiPolicy.CMDLINE_LONG: "b", BhiPolicy.LONG_NEEDED_BIT: "c",
           BhiPolicy.FORCE_BHI_DIS_S: "d"}


@dataclass(frozen=True)
class PolicyText:
    """What a policy means for each party (docs/bhi.md gives the same in a table)."""

    shown: str
    guest_must: str
    vmm_forces: str
    exposed: str
    pays: str

    def to_json(self) -> dict[str, str]:
        return {"shown": self.shown, "guest_must": self.guest_must, "vmm_forces": self.vmm_forces,
                "left_exposed": self.exposed, "pays": self.pays}


_TEXT = {
    BhiPolicy.LONG_UNDER_HYPERVISOR: PolicyText(
        "nothing new",
        "run the long (12 x 7) loop whenever CPUID.1.ECX[31] (hypervisor) is set",
        "nothing for BHI",
        "guests whose kernel does not implement the rule (every released Linux) on hosts with the longer history",
        "every guest on every host pays the long loop, also in pools where the short one is enough"),
    BhiPolicy.CMDLINE_LONG: PolicyText(
        "nothing new",
        "be booted with spectre_bhi=long where its pool has a host with the longer history (the operator must "
        "know), and know the option",
        "nothing for BHI",
        "guests booted without the option (or with a kernel that ignores it) on hosts with the longer history, "
        "also after the pool gains such a host",
        "guests booted with the option pay the long loop on every host"),
    BhiPolicy.LONG_NEEDED_BIT: PolicyText(
        "LONG_BHB_NEEDED = 1 where some host of the VM's pool has the longer history (docs/interface.md section 9)",
        "run the long loop when shown the bit",
        "nothing for BHI; refuses to move a VM shown LONG_BHB_NEEDED = 0 to a host with the longer history",
        "guests that do not understand the bit on hosts with the longer history",
        "guests in pools with a long-history host pay the long loop on every host of the pool"),
    BhiPolicy.FORCE_BHI_DIS_S: PolicyText(
        "nothing new",
        "nothing (an enlightened guest reports the short loop; an unenlightened one is assumed to use it)",
        "BHI_DIS_S where the short loop is too short, for guests that report it or are assumed to use it",
        "nobody among guests that report or are assumed to (a guest the operator trusts is exposed by that choice)",
        "guests on long-history hosts run with BHI_DIS_S, a cost one major non-Linux guest is reported to suffer "
        "heavily from (Pawan Gupta, <20260307010051.u4ugg3nyvsu6hwbg@desk>)"),
}


def parse_policy(text: str) -> BhiPolicy:
    """ValueError naming the choices."""
    try:
        return BhiPolicy(text)
    except ValueError:
        raise ValueError(f"BHI policy {text!r} is not one of {', '.join(POLICY_NAMES)}") from None


def long_history(host: CpuFacts) -> bool:
    """Is the short loop too short on `host` (the rule is `derive.bhb_short_effective`'s)?"""
    return not bhb_short_effective(host).answer


def long_bhb_needed(hosts: Iterable[CpuFacts]) -> bool:
    """LONG_BHB_NEEDED for a VM whose pool is `hosts`: some host has the longer history (or may have: an unknown
    fact counts as long, the answer that protects the guest)."""
    return any(long_history(h) for h in hosts)


def shown_long_bit(policy: BhiPolicy, hosts: Iterable[CpuFacts]) -> bool | None:
    """What the VMM shows in LONG_BHB_NEEDED under `policy`: the pool's answer under (c), None (not shown)
    otherwise."""
    return long_bhb_needed(hosts) if policy.shows_long_bit else None


def long_bit_reasons(shown: bool | None, host: CpuFacts) -> tuple[str, ...]:
    """Why `host` cannot take a VM that was shown LONG_BHB_NEEDED = 0 at boot (empty when it can): a guest that
    honours the bit runs the short loop, which is too short here. A VM not shown the bit, or shown 1, fits."""
    if shown is not False:
        return ()
    f = bhb_short_effective(host)
    if f.answer:
        return ()
    return (f"the VM was shown LONG_BHB_NEEDED = 0 at boot (the short BHB-clearing sequence is enough on every host "
            f"of its pool), which is false on this host ({f.reason}): a guest that honours the bit would run the "
            f"short loop here",)
