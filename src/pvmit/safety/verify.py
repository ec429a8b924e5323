"""`pvmit verify`: an exhaustive check of pvmit's promise over a whole catalog.

The promise: a guest that reported a software mitigation never runs on a host where that mitigation is
ineffective without the compensating hardware control in effect, unless pvmit refused the move or an operator
override was taken and reported.

For every ordered pair of catalog models (source, destination), every set of request bits the guest tries to
report, every interface form, every pool the VM may be promised, and every operator setting, the real state
machine and policy code runs: boot on the source (the guest writes its report; bits not enumerated raise #GP),
migration (snapshot, the destination's check and restore) and the guest's later writes on the destination (every
request value, reserved bits, attempts to clear IA32_SPEC_CTRL). After every step the promise is checked against
`pvmit.derive` (which, for each mitigation on each host, says whether it is effective and which control makes up for
it), independently of the policy that forced the controls.

`pvmit.derive` itself is checked first against a second statement of the same rules written from the sources as
tables (`pvmit.safety.reference_rules`, no code shared), on every catalog model and on synthetic facts (every
combination of the deciding bits, known, inferred and unknown): a wrong derivation would otherwise pass, since the
promise above is judged by derive too.

The pool rule (`pvmit.pool.rule`) is checked on every pair too: a migration `restore` accepted never lands a VM on
a host where a speculation bit it was shown at boot is false, and what a pool of the two models may show is true on
both (a VM booted with the pool's bits is refused by neither for a bit).

The four BHI policies (`pvmit.interface.bhi`): every scenario above runs under force-bhi-dis-s, the default; each
other policy runs every pair, pool and reported set too (neutral form, both settings for unreporting guests). The
promise is the same under each: a mitigation a guest reported is kept effective, since under the policies that do
not force BHI_DIS_S MITIGATION_ENUM never promises the short loop where it is too short; under long-needed-bit a VM
shown LONG_BHB_NEEDED = 0 is never accepted where the short loop is too short. What each policy leaves to the guest
by design (an unreporting guest that may run the short loop, on a host with the longer history) is counted per
policy and listed by guest (`pvmit.interface.bhi_compare`), not counted as a violation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from pvmit import derive
from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog, CpuModel, load_catalog
from pvmit.derive import Mitigation, Need, need
from pvmit.interface.bhi import DEFAULT_POLICY, BhiPolicy, long_history, shown_long_bit
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import Decision, OperatorSettings, decide, supported_requests
from pvmit.interface.state import restore, snapshot
from pvmit.pool.rule import CHECKED_RULES, host_safe_bits, pool_bit_table, pool_bits, shown_bit_violations
from pvmit.safety import reference_rules
from pvmit.x86.bits import SpecCtrl

R_DIS, B_DIS = int(SpecCtrl.RRSBA_DIS_S), int(SpecCtrl.BHI_DIS_S)
SETTINGS: tuple[tuple[str, OperatorSettings], ...] = tuple(
    (f"{unreported}{'' if not name else ', ' + name}", OperatorSettings(on, off, unreported))
    for unreported in ("assume-worst", "trust")
    for name, on, off in (("", 0, 0), ("force on RRSBA_DIS_S", R_DIS, 0), ("force on BHI_DIS_S", B_DIS, 0),
                          ("force off RRSBA_DIS_S", 0, R_DIS), ("force off BHI_DIS_S", 0, B_DIS))
)
"""Operator settings explored: both policies for unreporting guests, with no force, and each control forced on or
off."""
POLICY_SETTINGS: tuple[tuple[str, OperatorSettings], ...] = tuple(
    (f"{unreported}, {p.value}", OperatorSettings(unreported=unreported, bhi_policy=p))
    for p in BhiPolicy if p is not DEFAULT_POLICY for unreported in ("assume-worst", "trust"))
"""The other BHI policies, each with both settings for unreporting guests (neutral form only: the policies do not
depend on the wire form)."""
LATER_WRITES = (0, 1, 2, 3, 1 << 2, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF)


class MemoDecider:
    """`policy.decide`, remembered by the content of its arguments (the verifier asks the same questions many
    times; facts parsed from a snapshot are new objects with the same content)."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[CpuFacts, tuple[Any, ...]]] = {}
        self._answers: dict[tuple[Any, ...], Decision] = {}
        self._needs: dict[tuple[Any, ...], Need] = {}

    def _key(self, f: CpuFacts) -> tuple[Any, ...]:
        hit = self._keys.get(id(f))
        if hit is not None and hit[0] is f:
            return hit[1]
        key = (f.vendor, f.family, f.model, f.stepping,
               tuple(sorted((k, r.value, r.known, r.inferred) for k, r in f.registers.items())))
        self._keys[id(f)] = (f, key)
        return key

    def __call__(self, host: CpuFacts, reliance: frozenset[Mitigation] | None, personality: CpuFacts,
                 settings: OperatorSettings) -> Decision:
        k = (self._key(host), reliance, self._key(personality), settings)
        d = self._answers.get(k)
        if d is None:
            d = self._answers[k] = decide(host, reliance, personality, settings)
        return d

    def need(self, host: CpuFacts, m: Mitigation) -> Need:
        k = (self._key(host), m)
        n = self._needs.get(k)
        if n is None:
            n = self._needs[k] = need(host, m)
        return n


@dataclass
class Violation:
    source: str
    destination: str
    form: str
    pool: str
    reported: int
    settings: str
    step: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class PolicyTally:
    """One BHI policy's share of the scenarios."""

    scenarios: int = 0
    accepted: int = 0
    accepted_forced: int = 0
    refused: int = 0
    exposed_by_design: int = 0  # accepted where the policy leaves the short loop to an unreporting guest

    def to_json(self) -> dict[str, int]:
        return {"scenarios": self.scenarios, "accepted": self.accepted,
                "accepted_with_forced_controls": self.accepted_forced, "refused": self.refused,
                "exposed_by_design": self.exposed_by_design}


@dataclass
class Tally:
    scenarios: int = 0
    pairs: int = 0
    accepted: int = 0
    accepted_forced: int = 0
    refused: int = 0
    overrides: int = 0
    derivations: int = 0  # CPUs whose derivation was checked against the reference rules
    violations: list[Violation] = field(default_factory=list)
    policies: dict[str, PolicyTally] = field(default_factory=lambda: {p.value: PolicyTally() for p in BhiPolicy})
    guests_by_design: dict[str, list[str]] = field(default_factory=dict)  # policy -> guests it leaves exposed

    def to_json(self, limit: int = 50) -> dict[str, Any]:
        return {"schema": "pvmit.verify/1", "pairs": self.pairs, "scenarios": self.scenarios,
                "derivations_checked": self.derivations,
                "accepted": self.accepted, "accepted_with_forced_controls": self.accepted_forced,
                "refused": self.refused, "operator_overrides_reported": self.overrides,
                "violations": len(self.violations),
                "violation_examples": [v.to_json() for v in self.violations[:limit]],
                "bhi_policies": {k: {**v.to_json(), "guests_exposed_by_design": self.guests_by_design.get(k, [])}
                                 for k, v in self.policies.items()}}


def promise_violations(vm: VmInterface, need: Callable[[CpuFacts, Mitigation], Need] = need) -> list[str]:
    """Problems with the promise for `vm` on its current host: one per reported mitigation that is ineffective
    here while its control is not in effect in hardware, and is not covered by a reported operator override."""
    problems = []
    for i, v in enumerate(vm.vcpus):
        if not v.reported:
            continue
        for m in Mitigation:
            if not v.ctrl & int(m.request_bit):
                continue
            n = need(vm.host, m)
            if not n.must_force:
                continue
            held = bool(v.spec.effective & int(n.control)) and bool(v.spec.mask & int(n.control))
            if held and n.can_force:
                continue
            overridden = any(e.override and e.mitigation is m for e in v.decision.exposures) and any(
                str(n.control.name) in w for w in v.decision.warnings)
            if not overridden:
                problems.append(f"vCPU {i} reported {m.value}, ineffective here ({n.effective.reason}); "
                                f"{n.control.name} {'held' if held else 'not held'}, "
                                f"{'exists' if n.can_force else 'absent'} on this host")
    return problems


def derivation_disagreements(cpu: CpuFacts) -> list[str]:
    """Where `pvmit.derive` and the reference rules answer differently for `cpu`: whether each mitigation is
    effective, whether its control exists, whether it can be forced. Each line shows both answers and why."""
    problems = []
    for m in Mitigation:
        n = derive.need(cpu, m)  # looked up now: the check judges whatever derive answers at this moment
        e = reference_rules.expected(cpu, m.value)
        exists = derive.control_available(cpu, m.control)
        for what, derived, reason, ref, ref_why in (
                ("effective", n.effective.answer, n.effective.reason, e.effective, e.why[0]),
                (f"{m.control.name} exists", exists.answer, exists.reason, e.control_exists, e.why[1]),
                (f"{m.control.name} can be forced", n.can_force, n.available.reason, e.can_force, e.why[1])):
            if derived != ref:
                problems.append(f"{m.title} {what}: derive says {'yes' if derived else 'no'} ({reason}); the "
                                f"reference rules say {'yes' if ref else 'no'} ({ref_why})")
        for what, said, ref_assumed in (("effective", n.effective.assumed, e.effective_assumed),
                                        (f"{m.control.name} exists", exists.assumed, e.control_assumed)):
            if set(said) != set(ref_assumed):
                problems.append(f"{m.title} {what}: derive takes {', '.join(said) or 'nothing'} as assumed; the "
                                f"reference rules, {', '.join(ref_assumed) or 'nothing'}")
    return problems


def check_derivation(cpus: Iterable[tuple[str, CpuFacts]], tally: Tally) -> None:
    """Count each CPU checked, and a violation (step "derivation") for every disagreement."""
    for label, cpu in cpus:
        tally.derivations += 1
        for p in derivation_disagreements(cpu):
            tally.violations.append(Violation(label, "-", "-", "-", 0, "-", "derivation", p))


def pool_violations(src: CpuModel, dst: CpuModel) -> list[str]:
    """Bits a pool of `src` and `dst` would show that one of them cannot keep true for a guest shown them."""
    pool = pool_bits([(src.id, src.facts), (dst.id, dst.facts)])
    problems = []
    for b in pool_bit_table():
        if b.rule not in CHECKED_RULES or not pool.bits[b.key].show:
            continue
        for m in (src, dst):
            mask, why = host_safe_bits(m.facts)[b.register.key]
            if not mask & b.mask:
                problems.append(f"the pool shows {b.key} ({pool.bits[b.key].why}), false on {m.id}: {why[b.name]}")
    return problems


def _scenario(src: CpuModel, dst: CpuModel, form: Form, pool: str, reported: int, sname: str,
              settings: OperatorSettings, tally: Tally, memo: MemoDecider) -> None:
    hosts: list[CpuFacts] = [src.facts] if pool == "source" else [src.facts, dst.facts]
    policy = settings.bhi_policy
    config = InterfaceConfig(form, supported_requests(hosts, policy), bhb_long=shown_long_bit(policy, hosts))
    vm = VmInterface(config, src.facts, src.facts, settings, 1, decider=memo)
    where = (src.id, dst.id, form.value, pool, reported, sname)
    per = tally.policies[policy.value]

    def violation(step: str, detail: str) -> None:
        tally.violations.append(Violation(*where, step, detail))

    ctrl = vm.config.ctrl_msr
    ok = vm.wrmsr(0, ctrl, reported)
    if ok != (not reported & ~vm.config.supported):
        violation("boot", f"CTRL write {reported:#x} {'accepted' if ok else 'refused'} against ENUM "
                          f"{vm.config.supported:#x}")
    for p in promise_violations(vm, memo.need):
        violation("boot", p)
    state = json.loads(json.dumps(snapshot(vm)))
    verdict, moved = restore(state, dst.facts, decider=memo)
    tally.scenarios += 1
    per.scenarios += 1
    if moved is None:
        tally.refused += 1
        per.refused += 1
        if verdict.accepted:
            violation("migration", "accepted but not restored")
        return
    tally.accepted += 1
    per.accepted += 1
    if config.bhb_long is False and long_history(dst.facts):
        violation("migration", "accepted although the VM was shown LONG_BHB_NEEDED = 0 and the short loop is too "
                               "short here")
    if any(d.by_design for d in verdict.decisions):
        per.exposed_by_design += 1
    for bit, why in shown_bit_violations(src.facts, dst.facts):
        violation("migration", f"accepted although the VM was shown {bit}, false here: {why}")
    if moved.vcpus[0].spec.mask & moved.vcpus[0].spec.forced:
        tally.accepted_forced += 1
        per.accepted_forced += 1
    if any(e.override for d in verdict.decisions for e in d.exposures):
        tally.overrides += 1
    for p in promise_violations(moved, memo.need):
        violation("after migration", p)
    for value in LATER_WRITES:
        before = moved.vcpus[0].ctrl
        accepted = moved.wrmsr(0, ctrl, value if form is not Form.KVM else value & 0xFFFF_FFFF_FFFF_FFFF)
        if not accepted and moved.vcpus[0].ctrl != before:
            violation("later write", f"refused CTRL write {value:#x} changed the register")
        moved.wrmsr(0, 0x48, 0)  # the guest tries to clear whatever is forced
        for p in promise_violations(moved, memo.need):
            violation(f"later CTRL write {value:#x}", p)


def _sources(catalog_files: list[str], sources: list[str], targets: list[str]) -> Tally:
    """Every scenario whose source model is in `sources` (run in a worker process)."""
    catalog = load_catalog(catalog_files)
    tally = Tally()
    memo = MemoDecider()
    for src_id in sources:
        src = catalog.get(src_id)
        for dst in (catalog.get(t) for t in targets):
            tally.pairs += 1
            for p in pool_violations(src, dst):
                tally.violations.append(Violation(src.id, dst.id, "-", "source+destination", 0, "-", "pool", p))
            for form in Form:
                for pool in ("source", "source+destination"):
                    for reported in range(4):
                        for sname, settings in SETTINGS:
                            _scenario(src, dst, form, pool, reported, sname, settings, tally, memo)
                        if form is Form.NEUTRAL:
                            for sname, settings in POLICY_SETTINGS:
                                _scenario(src, dst, form, pool, reported, sname, settings, tally, memo)
    return tally


def verify(catalog_files: list[str], models: Iterable[str] | None = None, *, jobs: int = 0,
           progress: Callable[[int, int], None] | None = None, synthetic: bool = True) -> Tally:
    """Check the derivation of every model against the reference rules (and, with `synthetic`, of every
    combination of the deciding bits), then every scenario over the catalog (the built-in one plus
    `catalog_files`), or over `models` of it. Source models are spread over `jobs` worker processes (0: one per
    CPU)."""
    catalog = load_catalog(catalog_files)
    ids = [catalog.get(m).id for m in models] if models else [m.id for m in catalog]
    jobs = jobs or os.cpu_count() or 1
    total = Tally()
    total.guests_by_design = guests_by_design(Catalog(tuple(catalog.get(i) for i in ids), catalog.sources))
    check_derivation(((i, catalog.get(i).facts) for i in ids), total)
    if synthetic:
        check_derivation(reference_rules.synthetic(), total)
    done = 0
    if jobs == 1:
        parts = [_sources(catalog_files, [s], ids) for s in ids]
        for t in parts:
            _merge(total, t)
            done += 1
            if progress:
                progress(done, len(ids))
        return total
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(_sources, catalog_files, [s], ids) for s in ids]
        for fut in as_completed(futures):
            _merge(total, fut.result())
            done += 1
            if progress:
                progress(done, len(ids))
    return total


def _merge(total: Tally, part: Tally) -> None:
    for name in ("scenarios", "pairs", "accepted", "accepted_forced", "refused", "overrides", "derivations"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.violations.extend(part.violations)
    for key, pt in part.policies.items():
        t = total.policies[key]
        for name in ("scenarios", "accepted", "accepted_forced", "refused", "exposed_by_design"):
            setattr(t, name, getattr(t, name) + getattr(pt, name))


def guests_by_design(catalog: Catalog) -> dict[str, list[str]]:
    """Per policy, the guests (`bhi_compare`'s kinds) it leaves exposed somewhere in the catalog's pools, each with
    the pools where, as 'guest (scenario)'."""
    from pvmit.interface.bhi_compare import compare

    out: dict[str, list[str]] = {p.value: [] for p in BhiPolicy}
    for r in compare(catalog):
        out[r.policy.value] += [f"{g} ({r.scenario} pool)" for g in r.summary()["guests_exposed"]]
    return out
