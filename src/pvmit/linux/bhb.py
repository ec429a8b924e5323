"""Which BHB-clearing loop a Linux guest runs on kernel entry, and how each BHI proposal would change it. Pure.

Released kernels (5.10 to 6.18, `pvmit.linux.model`) run `clear_bhb_loop` with 5 x 5 iterations wherever they pick
the software BHI mitigation ("BHI: SW loop"), which they do when not shown BHI_CTRL; shown BHI_CTRL they set
BHI_DIS_S themselves. The VMSCAPE/BHB series (v11, <20260422-vmscape-bhb-v11-0-b18e0cf32af4@linux.intel.com>, not
merged as of v7.1) makes the counts 12 x 7 "on newer CPUs (with BHI_CTRL support)": a guest shown BHI_CTRL uses
BHI_DIS_S instead, so the series alone changes nothing for a guest in a pool that spans Alder Lake.

The three guest-side proposals (pvmit.interface.bhi) are modelled as features a kernel may carry; no released
kernel carries any of them:
  long-under-hypervisor  the long counts also when X86_FEATURE_HYPERVISOR is set ("| cpu_feature_enabled(
                         X86_FEATURE_HYPERVISOR)", <CALMp9eSPkMpKQELTnsaj6=gXD+EyE0n2_p93n4maDc93bPFe+w@
                         mail.gmail.com>);
  spectre_bhi=long       a command-line option selecting the long counts (<20260403185236.sjgetnkha3o3a4d3@desk>);
                         a kernel without it ignores the word ("Ignoring unknown spectre_bhi option", since
                         42c141fbb651; 6.1's parser knows on|off only, linux/kernels.toml rule bhi_vmexit);
  long-needed-bit        the long counts when the hypervisor shows LONG_BHB_NEEDED (docs/interface.md section 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from pvmit.catalog.facts import CpuFacts
from pvmit.linux.kernel import CURRENT, Kernel
from pvmit.linux.model import Cmdline, predict
from pvmit.linux.spectre_v2 import Bhi

SHORT = (5, 5)
LONG = (12, 7)
"""(outer, inner) iterations of clear_bhb_loop: entry_64.S 'movl $5, %ecx' / 'movl $5, %eax'; v11 patch 2
'bhb_seq_outer_loop = 12; bhb_seq_inner_loop = 7'."""

Loop = Literal["none", "short", "long"]


class Proposal(Enum):
    """A guest-side proposal a kernel may carry (none is in a released kernel)."""

    LONG_UNDER_HYPERVISOR = "long-under-hypervisor"
    SPECTRE_BHI_LONG = "spectre_bhi=long"
    LONG_NEEDED_BIT = "long-needed-bit"


@dataclass(frozen=True)
class BhbChoice:
    """What the guest does against BHI on kernel entry."""

    bhi: Bhi  # the BHI mitigation `pvmit.linux.model.predict` gives
    loop: Loop  # the BHB-clearing loop it runs on kernel entry
    own_bhi_dis_s: bool  # it sets BHI_DIS_S itself (shown BHI_CTRL)
    reason: str

    @property
    def counts(self) -> tuple[int, int] | None:
        return {"short": SHORT, "long": LONG}.get(self.loop)

    def to_json(self) -> dict[str, object]:
        return {"bhi": self.bhi.name, "loop": self.loop, "counts": self.counts, "own_bhi_dis_s": self.own_bhi_dis_s,
                "reason": self.reason}


def bhb_choice(shown: CpuFacts, kernel: Kernel = CURRENT, cmdline: Cmdline = Cmdline(), *,
               proposals: frozenset[Proposal] = frozenset(), spectre_bhi_long: bool = False,
               long_bit: bool = False) -> BhbChoice:
    """The loop a guest kernel shown `shown` runs. `spectre_bhi_long`: booted with spectre_bhi=long (the word is
    given here, not in `cmdline`, since released kernels ignore it); `long_bit`: shown LONG_BHB_NEEDED = 1."""
    p = predict(shown, cmdline, kernel=kernel)
    if p.bhi is Bhi.BHI_DIS_S:
        return BhbChoice(p.bhi, "none", True, "shown BHI_CTRL: sets BHI_DIS_S itself")
    if not p.bhi.uses_short_loop:
        return BhbChoice(p.bhi, "none", False, f"BHI: {p.bhi.value}: no BHB-clearing loop on kernel entry")
    why = [(Proposal.LONG_UNDER_HYPERVISOR, True, "runs under a hypervisor and the kernel takes the long loop there"),
           (Proposal.SPECTRE_BHI_LONG, spectre_bhi_long, "booted with spectre_bhi=long"),
           (Proposal.LONG_NEEDED_BIT, long_bit, "shown LONG_BHB_NEEDED = 1")]
    for proposal, condition, text in why:
        if proposal in proposals and condition:
            return BhbChoice(p.bhi, "long", False, f"{text} (proposal {proposal.value})")
    missed = [t for pr, c, t in why[1:] if c and pr not in proposals]
    return BhbChoice(p.bhi, "short", False, "the short loop" + (
        f"; {missed[0]}, which this kernel does not act on" if missed else ""))
