"""The four BHI policies side by side on the same pools: who is exposed, what is forced, who pays. Pure.

Each guest of interface/bhi_guests.toml boots in a pool (shown what the pool rule lets it see, MITIGATION_ENUM and
LONG_BHB_NEEDED for that pool under the policy), picks its loop (`pvmit.linux.bhb`), reports it if it is enlightened,
and is then checked onto every host of a scenario by the migration check itself (`interface.state.check`, which
runs `policy.decide`): the real VMM code decides what is forced and what is refused. A placement is

  exposed   the host has the longer branch history, the guest runs the short loop (or none), and BHI_DIS_S is in
            effect neither by the guest's choice nor forced;
  forced    the VMM forces BHI_DIS_S for it there;
  long      the guest runs the long loop (where the host's history is short, it pays for nothing: "needless");
  refused   the migration check would not take it there (the guest stays where it is).

Scenarios over a catalog's Intel server models: pre (only parts before Alder Lake), post (only Alder Lake and newer),
mixed (both), and grown (booted in the pre pool, later moved to a post host, as when a pool gains new hardware).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog, CpuModel
from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.interface.bhi import BhiPolicy, long_bhb_needed, long_history, shown_long_bit
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings, supported_requests
from pvmit.interface.state import check, snapshot
from pvmit.linux.bhb import BhbChoice, Proposal, bhb_choice
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.linux.spectre_v2 import Bhi
from pvmit.pool.rule import personality_for_pool, pool_bits
from pvmit.x86.bits import SpecCtrl

PROPOSAL = {BhiPolicy.LONG_UNDER_HYPERVISOR: Proposal.LONG_UNDER_HYPERVISOR,
            BhiPolicy.CMDLINE_LONG: Proposal.SPECTRE_BHI_LONG, BhiPolicy.LONG_NEEDED_BIT: Proposal.LONG_NEEDED_BIT}
"""The guest side of each policy ((d) has none: the guest changes nothing)."""
SCENARIOS = ("pre", "post", "mixed", "grown")


@dataclass(frozen=True)
class GuestKind:
    id: str
    what: str
    kernel: Kernel
    enlightened: bool
    follows_policy: bool
    tolerates_bhi_dis_s: bool
    source: str


@lru_cache(maxsize=1)
def guest_kinds() -> tuple[GuestKind, ...]:
    """interface/bhi_guests.toml."""
    doc: dict[str, Any] = tomllib.loads((resources.files("pvmit.interface") / "bhi_guests.toml").read_text("utf-8"))
    return tuple(GuestKind(g["id"], g["what"], Kernel(KernelVersion.parse(g["kernel"])), bool(g["enlightened"]),
                           bool(g["follows_policy"]), bool(g["tolerates_bhi_dis_s"]), g["source"])
                 for g in doc["guest"])


@dataclass(frozen=True)
class Placement:
    """One guest on one host under one policy."""

    guest: str
    host: str
    choice: BhbChoice
    accepted: bool
    forced: bool
    exposed: bool
    needless_long: bool
    pays_bhi_dis_s: bool  # BHI_DIS_S forced on a guest that does not tolerate it
    reason: str


@dataclass
class ScenarioResult:
    policy: BhiPolicy
    scenario: str
    boot: tuple[str, ...]
    hosts: tuple[str, ...]
    long_bit: bool | None
    placements: list[Placement] = field(default_factory=list)

    def _guests(self, pick: Any) -> list[str]:
        return list(dict.fromkeys(p.guest for p in self.placements if pick(p)))

    def summary(self) -> dict[str, Any]:
        n = len(self.placements)
        accepted = [p for p in self.placements if p.accepted]
        return {
            "policy": self.policy.value, "scenario": self.scenario, "boot_pool": list(self.boot),
            "hosts": list(self.hosts), "long_bhb_needed_shown": self.long_bit,
            "guests": len({p.guest for p in self.placements}), "placements": n,
            "guests_exposed": self._guests(lambda p: p.exposed),
            "placements_exposed": sum(p.exposed for p in self.placements),
            "placements_forced": sum(p.forced for p in accepted),
            "guests_forced": self._guests(lambda p: p.forced),
            "guests_long_loop": self._guests(lambda p: p.choice.loop == "long"),
            "placements_long_needless": sum(p.needless_long for p in self.placements),
            "guests_paying_bhi_dis_s_averse": self._guests(lambda p: p.pays_bhi_dis_s),
            "placements_refused": sum(not p.accepted for p in self.placements),
            "guests_refused": self._guests(lambda p: not p.accepted),
        }


def newer_generation(cpu: CpuFacts) -> bool:
    """Alder Lake or newer: BHI_CTRL, BHI_NO, or the longer history (an unknown answer counts as newer)."""
    return long_history(cpu) or bool(cpu.fact("cpuid_7_2_edx", "BHI_CTRL").value) or bool(
        cpu.fact("arch_capabilities", "BHI_NO").value)


def scenario_pools(catalog: Catalog) -> dict[str, tuple[list[CpuModel], list[CpuModel]]]:
    """(boot pool, hosts run on) per scenario, over the catalog's Intel server models with eIBRS, oldest first.
    Parts without eIBRS are left out: a pool with one shows no eIBRS, its guests use retpoline, and retpoline on
    their RSBA or RRSBA neighbours is refused whatever the BHI policy (`pvmit verify` covers that)."""
    servers = sorted((m for m in catalog if m.vendor == "intel" and m.segment == "server"
                      and m.facts.fact("arch_capabilities", "IBRS_ALL").value),
                     key=lambda m: (m.year or 9999, m.id))
    pre = [m for m in servers if not newer_generation(m.facts)]
    post = [m for m in servers if newer_generation(m.facts)]
    return {"pre": (pre, pre), "post": (post, post), "mixed": (pre + post, pre + post), "grown": (pre, post)}


def _protected(choice: BhbChoice, forced: bool, host: CpuFacts) -> bool:
    if choice.own_bhi_dis_s or forced or choice.bhi in (Bhi.RETPOLINE, Bhi.NOT_AFFECTED):
        return True
    return choice.loop == "long" if long_history(host) else choice.loop != "none"


def run_scenario(policy: BhiPolicy, scenario: str, boot: Sequence[CpuModel], hosts: Sequence[CpuModel],
                 kinds: Sequence[GuestKind] | None = None) -> ScenarioResult:
    """Every guest kind, booted in `boot` and checked onto every host of `hosts` under `policy`. MITIGATION_ENUM
    and LONG_BHB_NEEDED are the boot pool's, as the VMM computed them at boot; the CPU model shown is the first boot
    model with the bits every host of the scenario keeps true (an operator's baseline model), so that a move is
    refused for what the BHI policy promised, not for a speculation bit the newer hosts lack."""
    facts = [m.facts for m in boot]
    every = {m.id: m for m in [*boot, *hosts]}
    shown = personality_for_pool(boot[0].facts, pool_bits([(i, m.facts) for i, m in every.items()]))
    long_bit = shown_long_bit(policy, facts)
    supported = supported_requests(facts, policy)
    settings = OperatorSettings(bhi_policy=policy)
    config = InterfaceConfig(Form.NEUTRAL, supported, bhb_long=long_bit)
    result = ScenarioResult(policy, scenario, tuple(m.id for m in boot), tuple(m.id for m in hosts), long_bit)
    for kind in kinds or guest_kinds():
        proposals = frozenset({PROPOSAL[policy]}) if kind.follows_policy and policy in PROPOSAL else frozenset()
        choice = bhb_choice(shown, kind.kernel, proposals=proposals,
                            spectre_bhi_long=policy is BhiPolicy.CMDLINE_LONG and long_bhb_needed(facts),
                            long_bit=bool(long_bit))
        vm = VmInterface(config, facts[0], shown, settings)
        if kind.enlightened:  # it reports the short loop where it runs it and MITIGATION_ENUM lets it
            uses = frozenset({Mitigation.BHB_SHORT}) if choice.loop == "short" else frozenset()
            vm.wrmsr(0, config.ctrl_msr, mitigations_to_bits(uses) & supported)
        state = snapshot(vm)
        for m in hosts:
            verdict = check(state, m.facts)
            d = verdict.decisions[0]
            forced = any(f.control is SpecCtrl.BHI_DIS_S and f.on for f in d.forced)
            exposed = verdict.accepted and not _protected(choice, forced, m.facts)
            result.placements.append(Placement(
                kind.id, m.id, choice, verdict.accepted, forced and verdict.accepted, exposed,
                verdict.accepted and choice.loop == "long" and not long_history(m.facts),
                verdict.accepted and not kind.tolerates_bhi_dis_s and forced,
                "; ".join(verdict.reasons) or choice.reason))
    return result


def compare(catalog: Catalog, policies: Sequence[BhiPolicy] = tuple(BhiPolicy),
            kinds: Sequence[GuestKind] | None = None) -> list[ScenarioResult]:
    """Every policy on every scenario of `catalog`."""
    pools = scenario_pools(catalog)
    return [run_scenario(p, s, *pools[s], kinds) for p in policies for s in SCENARIOS if pools[s][0] and pools[s][1]]
