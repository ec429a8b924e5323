"""The fleet plan: for every (VM class, host class) pair, what moving there means; then per VM and per pool.

A pair is judged with the interface's own rules and nothing else: `policy.decide` for the controls the
destination forces and the exposures it leaves, `state.broken_promises` for MITIGATION_ENUM bits it cannot
honour, and `pool.rule.shown_bit_violations` for speculation bits the VM was shown at boot that are false there,
exactly as `state.check` answers a migration. Verdicts:

  safe     nothing would be forced and nothing is exposed
  forced   safe only because IA32_SPEC_CTRL controls are forced there (which, and why, are given)
  exposed  `check` would refuse the VM there, or an operator setting leaves a mitigation it relies on
           ineffective (`check` accepts that, the operator chose it, but the VM is unprotected: the planner says so),
           or the BHI policy leaves the short loop to an unenlightened guest where it is too short (accepted too)

Pure and columnar: pairs are decided once per class pair (and the decision once per distinct input to `decide`),
then per-VM answers come from array lookups: a VM's destination counts are its class's counts over host classes,
less its own host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import Mitigation
from pvmit.fleet.classes import Fleet, HostClass, VmClass
from pvmit.fleet.columns import SLICE
from pvmit.fleet.inventory import IntArray
from pvmit.interface.bhi import DEFAULT_POLICY, BhiPolicy, long_bit_reasons
from pvmit.interface.policy import Decision, OperatorSettings, PartialSettings, Why, decide
from pvmit.interface.state import broken_promises
from pvmit.pool.rule import pool_bits, shown_bit_violations

Decide = Callable[[CpuFacts, "frozenset[Mitigation] | None", CpuFacts, OperatorSettings], Decision]
Progress = Callable[[str], None]


class Verdict(IntEnum):
    SAFE = 0
    FORCED = 1
    EXPOSED = 2

    @property
    def word(self) -> str:
        return self.name.lower()


VERDICTS = tuple(Verdict)


@dataclass(frozen=True)
class Move:
    """What moving a VM of one class onto a host of one class means."""

    verdict: Verdict
    accepted: bool  # what interface.state.check answers
    forced: tuple[str, ...]  # IA32_SPEC_CTRL controls held on there
    reasons: tuple[str, ...]  # why forced, why exposed, or why nothing is needed
    warnings: tuple[str, ...] = ()
    assumed: tuple[str, ...] = ()  # unknown facts taken conservatively
    bits: tuple[str, ...] = ()  # speculation bits the VM was shown that are false there (each refuses the move)

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict.word, "accepted_by_check": self.accepted, "forced": list(self.forced),
                "reasons": list(self.reasons), "warnings": list(self.warnings), "assumed_facts": list(self.assumed),
                "constraining_bits": list(self.bits)}


class Judge:
    """Judges class pairs with `decide` and `broken_promises`, remembering each distinct input once.

    `decisions` counts calls of `decide`: at most one per class pair, fewer where classes share what decide sees.
    """

    def __init__(self, decide_fn: Decide = decide, bhi_policy: BhiPolicy = DEFAULT_POLICY) -> None:
        self._decide = decide_fn
        self.bhi_policy = bhi_policy
        self._decisions: dict[tuple[str, str, frozenset[Mitigation] | None, OperatorSettings], Decision] = {}
        self._promises: dict[tuple[str, int, bool | None], tuple[str, ...]] = {}
        self._shown: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._settings: dict[tuple[PartialSettings, PartialSettings], OperatorSettings] = {}
        self._moves: dict[tuple[str, str, frozenset[Mitigation] | None, OperatorSettings, int, bool | None], Move] = {}
        self.decisions = 0

    def __call__(self, vm: VmClass, host: HostClass) -> Move:
        sk = (host.settings, vm.settings)
        settings = self._settings.get(sk)
        if settings is None:
            settings = self._settings[sk] = dataclasses.replace(host.settings.over(vm.settings),
                                                                bhi_policy=self.bhi_policy)
        mk = (host.cpu_key, vm.personality_key, vm.reported, settings, vm.supported, vm.long_bhb)
        move = self._moves.get(mk)  # everything the move depends on: one Move per distinct input
        if move is None:
            move = self._moves[mk] = self._judge(vm, host, settings)
        return move

    def _judge(self, vm: VmClass, host: HostClass, settings: OperatorSettings) -> Move:
        k = (host.cpu_key, vm.personality_key, vm.reported, settings)
        d = self._decisions.get(k)
        if d is None:
            d = self._decisions[k] = self._decide(host.facts, vm.reported, vm.facts, settings)
            self.decisions += 1
        pk = (host.cpu_key, vm.supported, vm.long_bhb)
        broken = self._promises.get(pk)
        if broken is None:
            broken = self._promises[pk] = broken_promises(vm.supported, host.facts, self.bhi_policy) + \
                long_bit_reasons(vm.long_bhb, host.facts)
        shk = (host.cpu_key, vm.personality_key)
        shown = self._shown.get(shk)
        if shown is None:
            shown = self._shown[shk] = shown_bit_violations(vm.facts, host.facts)
        return move_from(d, broken, shown)


def move_from(d: Decision, broken: tuple[str, ...], shown: tuple[tuple[str, str], ...] = ()) -> Move:
    """A Move from the policy's decision, the broken promises and the shown bits false there, as `state.check`
    reads them (its reasons come in that order: promises, then bits, then each vCPU's exposures)."""
    accepted = d.safe and not broken and not shown
    bits = tuple(b for b, _ in shown)
    broken = broken + tuple(r for _, r in shown)
    exposed = tuple(("operator override: " if e.override else "") + e.reason for e in d.exposures) + tuple(
        f"left to the guest by the BHI policy: {e.reason}" for e in d.by_design) + broken
    forced = tuple(f for f in d.forced if f.on)
    names = tuple(str(f.control.name) for f in forced)
    if exposed:
        return Move(Verdict.EXPOSED, accepted, names, exposed, d.warnings, d.assumed, bits)
    why = tuple(f"{f.control.name} ({f.why.value}): {f.reason}" for f in forced)
    if any(f.why is not Why.OPERATOR for f in forced):  # safe only because the policy holds a control
        return Move(Verdict.FORCED, accepted, names, why, d.warnings, d.assumed)
    # safe as it is: controls an operator forces on every VM there are listed, but the guest needs none of them
    return Move(Verdict.SAFE, accepted, names, (d.notes or ("relies on nothing this host must make up for",)) + why,
                d.warnings, d.assumed)


@dataclass(frozen=True)
class Pool:
    """Hosts among which every VM of the listed classes may move freely (safe, or safe with forced controls)."""

    id: str
    host_classes: tuple[int, ...]
    vm_classes: tuple[int, ...]
    hosts: int
    vms: int
    forcing_hosts: int  # hosts of the pool on which some of its VM classes would have controls forced
    shows: tuple[str, ...] = ()  # speculation bits a VM booted in this pool may be shown (pool.rule.pool_bits)
    mitigation_enum: int = 0  # what the pool's hosts can all honour
    constraining_bits: tuple[str, ...] = ()  # shown bits that keep its VM classes off hosts outside the pool

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "host_classes": list(self.host_classes), "vm_classes": list(self.vm_classes),
                "hosts": self.hosts, "vms": self.vms, "hosts_forcing_controls": self.forcing_hosts,
                "shows": list(self.shows), "mitigation_enum": self.mitigation_enum,
                "constraining_bits": list(self.constraining_bits)}


Int8Array = npt.NDArray[np.int8]
Int32Array = npt.NDArray[np.int32]


@dataclass
class Plan:
    """The plan for a fleet; per-VM arrays are aligned with `fleet`'s VM arrays."""

    fleet: Fleet
    verdict: Int8Array  # [vm class, host class]
    move_of: Int32Array  # [vm class, host class] -> index into moves
    moves: list[Move]
    host_class_size: IntArray
    vm_class_size: IntArray
    class_counts: IntArray  # [vm class, verdict]: hosts of each verdict (all hosts)
    vm_here: Int8Array  # verdict on the VM's own host
    vm_counts: Int32Array  # [vm, verdict]: destinations of each verdict, own host excluded (columns contiguous)
    vm_class_pool: IntArray  # [vm class] -> index into pools, -1 where no host would take it
    pools: list[Pool]
    decisions: int
    movable: Int32Array  # per VM: destinations other than its own host where it stays protected (safe or forced)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return int(self.verdict.size)

    @functools.cached_property
    def stranded(self) -> IntArray:
        """Indices of VMs with no safe destination outside their own host."""
        return np.flatnonzero(self.movable == 0)

    def counts(self) -> dict[str, object]:
        here = bincount(self.vm_here, 3)
        stranded = self.stranded
        return {
            "hosts": self.fleet.num_hosts, "vms": self.fleet.num_vms,
            "host_rows_read": self.fleet.hosts_read, "vm_rows_read": self.fleet.vms_read,
            "row_errors": self.fleet.errors.total,
            "host_classes": len(self.fleet.host_classes), "vm_classes": len(self.fleet.vm_classes),
            "class_pairs": self.pairs, "decisions": self.decisions, "pools": len(self.pools),
            "vms_by_verdict_on_own_host": {v.word: int(here[v]) for v in VERDICTS},
            "vms_without_safe_destination": int(stranded.size),
            "vms_in_no_pool": int(self.vm_class_size[self.vm_class_pool < 0].sum()),
            "unenlightened_vms": int(self.vm_class_size[[c.reported is None for c in self.fleet.vm_classes]].sum())
            if self.fleet.vm_classes else 0,
        }


def plan(fleet: Fleet, judge: Judge | None = None, progress: Progress | None = None) -> Plan:
    """Decide every class pair, then derive per-VM answers and pools with array operations."""
    judge = judge or Judge()
    say = progress or (lambda _m: None)
    nvc, nhc = len(fleet.vm_classes), len(fleet.host_classes)
    say(f"deciding {nvc * nhc:,} class pairs ({nvc:,} VM classes x {nhc:,} host classes)")
    verdict = np.zeros((nvc, nhc), dtype=np.int8)
    move_of = np.zeros((nvc, nhc), dtype=np.int32)
    moves: list[Move] = []
    seen: dict[Move, int] = {}
    step = max(1, nvc // 10)
    for i, vc in enumerate(fleet.vm_classes):
        for j, hc in enumerate(fleet.host_classes):
            m = judge(vc, hc)
            verdict[i, j] = m.verdict
            move_of[i, j] = seen.setdefault(m, len(seen))
        if progress and nvc >= 50 and (i + 1) % step == 0:
            say(f"  {i + 1:,}/{nvc:,} VM classes decided")
    moves = list(seen)

    host_class_size = np.bincount(fleet.host_class, minlength=nhc).astype(np.int64)
    vm_class_size = bincount(fleet.vm_class, nvc)
    class_counts = np.stack([(verdict == v).astype(np.int64) @ host_class_size for v in VERDICTS], axis=1) \
        if nvc else np.zeros((0, 3), dtype=np.int64)

    say(f"expanding to {fleet.num_vms:,} VMs")
    vm_here, vm_counts, movable = _expand(fleet, verdict, class_counts)
    pools, vm_class_pool = _pools(verdict, host_class_size, vm_class_size)
    say(f"computing what each of {len(pools):,} pools may show")
    pools = [_pool_bits(p, fleet, verdict, move_of, moves) for p in pools]
    return Plan(fleet, verdict, move_of, moves, host_class_size, vm_class_size, class_counts, vm_here, vm_counts,
                vm_class_pool, pools, judge.decisions, movable)


def _expand(fleet: Fleet, verdict: Int8Array, class_counts: IntArray) -> tuple[Int8Array, Int32Array, Int32Array]:
    """Per VM: the verdict on its own host, its destinations by verdict (its class's hosts less its own host) and
    how many of them are safe or forced; each a lookup in a table over (VM class, verdict where it runs)."""
    n, (nvc, nhc) = fleet.num_vms, verdict.shape
    host_class = fleet.host_class.astype(np.int32)
    flat = verdict.reshape(-1)
    by_here = (class_counts[:, None, :] - np.eye(3, dtype=np.int64)[None, :, :]).reshape(nvc * 3, 3).astype(np.int32)
    tables = [np.ascontiguousarray(by_here[:, v]) for v in VERDICTS]
    tables.append(tables[Verdict.SAFE] + tables[Verdict.FORCED])
    vm_here: Int8Array = np.empty(n, dtype=np.int8)
    vm_counts: Int32Array = np.empty((n, 3), dtype=np.int32, order="F")  # each verdict's column contiguous
    movable: Int32Array = np.empty(n, dtype=np.int32)
    outs = [vm_counts[:, v] for v in VERDICTS] + [movable]
    step = SLICE
    for s in range(0, n, step):  # a slice of VMs at a time: no temporary as large as the fleet
        cls = fleet.vm_class[s:s + step].astype(np.int32)
        key = np.multiply(cls, nhc)
        key += host_class[fleet.vm_host[s:s + step]]  # (VM class, host class where it runs)
        np.take(flat, key, out=vm_here[s:s + step])
        np.multiply(cls, 3, out=key)  # (VM class, verdict where it runs)
        key += vm_here[s:s + step]
        for table, out in zip(tables, outs, strict=True):
            np.take(table, key, out=out[s:s + step])
    return vm_here, vm_counts, movable


def bincount(a: npt.NDArray[np.integer[Any]], length: int) -> IntArray:
    """np.bincount of small non-negative integers a million at a time (it would widen all of `a` to 64 bits)."""
    out = np.zeros(length, dtype=np.int64)
    for s in range(0, a.size, 1 << 20):
        out += np.bincount(a[s:s + (1 << 20)], minlength=length)[:length]
    return out


def _pool_bits(pool: Pool, fleet: Fleet, verdict: Int8Array, move_of: Int32Array, moves: list[Move]) -> Pool:
    """The pool rule over the pool's host classes, and the shown bits that refuse its VM classes elsewhere."""
    result = pool_bits([(fleet.host_classes[h].label, fleet.host_classes[h].facts) for h in pool.host_classes])
    shows = tuple(k for k, v in result.bits.items() if v.show)
    outside = np.setdiff1d(np.arange(verdict.shape[1]), np.array(pool.host_classes, dtype=np.int64))
    found: dict[str, None] = {}
    if outside.size:
        for k in np.unique(move_of[np.ix_(np.array(pool.vm_classes), outside)]):
            found.update(dict.fromkeys(moves[int(k)].bits))
    return dataclasses.replace(pool, shows=shows, mitigation_enum=result.mitigation_enum,
                               constraining_bits=tuple(sorted(found)))


def _pools(verdict: Int8Array, host_size: IntArray, vm_size: IntArray) -> tuple[list[Pool], IntArray]:
    """Group VM classes by the set of host classes that would take them; each distinct set is a pool."""
    groups: dict[bytes, list[int]] = {}
    movable = verdict <= Verdict.FORCED
    for i in range(verdict.shape[0]):
        if movable[i].any():
            groups.setdefault(np.packbits(movable[i]).tobytes(), []).append(i)
    raw = []
    for members in groups.values():
        hcs = np.flatnonzero(movable[members[0]])
        forcing = (verdict[np.ix_(np.array(members), hcs)] == Verdict.FORCED).any(axis=0)
        raw.append((tuple(int(h) for h in hcs), tuple(members), int(host_size[hcs].sum()),
                    int(vm_size[members].sum()), int(host_size[hcs][forcing].sum())))
    raw.sort(key=lambda p: (-p[2], -p[3], p[0]))
    vm_class_pool = np.full(verdict.shape[0], -1, dtype=np.int64)
    pools = []
    for n, (hcs_t, members_t, hosts, vms, forcing_hosts) in enumerate(raw):
        pools.append(Pool(f"P{n + 1}", hcs_t, members_t, hosts, vms, forcing_hosts))
        vm_class_pool[list(members_t)] = n
    return pools, vm_class_pool
