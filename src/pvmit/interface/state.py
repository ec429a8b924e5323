"""A versioned snapshot of everything the protocol holds for a VM, and restoring it on another host.

Restoring re-runs the policy against the new host and answers Accepted (with what is now forced, and what changed
from before) or Refused (with the reasons): a guest is never left less protected than it was without it being said.
The snapshot is plain JSON-ready data; the migration stream carries it as one section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pvmit.catalog.facts import CpuFacts
from pvmit.derive import Mitigation, mitigations_from_bits
from pvmit.errors import InputError
from pvmit.interface.bhi import DEFAULT_POLICY, BhiPolicy, long_bit_reasons
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import InterfaceConfig
from pvmit.interface.policy import Decision, OperatorSettings, PartialSettings, can_honour, decide
from pvmit.interface.pooldesc import not_listed_reasons
from pvmit.pool.rule import shown_bit_reasons
from pvmit.x86.bits import SpecCtrl

SCHEMA = "pvmit.interface-state/2"
"""/2 adds, in `config`, the LONG_BHB_NEEDED bit and the pool description the guest was shown, and in `settings` the
BHI policy; a /1 snapshot (none of them: the defaults) is still read. An older reader refuses /2 by its schema rather
than dropping what the guest was shown."""
READABLE = (SCHEMA, "pvmit.interface-state/1")
_SPEC_BITS = tuple((int(b), str(b.name)) for b in SpecCtrl)  # plain ints: IntFlag arithmetic is slow


def snapshot(vm: VmInterface) -> dict[str, Any]:
    """Everything needed to recreate `vm` elsewhere: config, personality, settings, per-vCPU registers and the
    controls that were forced on the source (so the destination can say what it changes)."""
    return {
        "schema": SCHEMA,
        "config": vm.config.to_json(),
        "personality": vm.personality.to_json(),
        "settings": vm.settings.to_json(),
        "vcpus": [
            {"ctrl": v.ctrl, "reported": v.reported, "spec_ctrl": v.spec.guest,
             "forced_mask": v.spec.mask, "forced_value": v.spec.forced}
            for v in vm.vcpus
        ],
    }


@dataclass(frozen=True)
class Change:
    """How one vCPU's forced controls differ between the source and this host."""

    vcpu: int
    added: tuple[str, ...]
    released: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"vcpu": self.vcpu, "added": list(self.added), "released": list(self.released)}


@dataclass(frozen=True)
class Verdict:
    """The answer to 'can this host take the VM': accepted with decisions and changes, or refused with reasons."""

    accepted: bool
    reasons: tuple[str, ...]
    decisions: tuple[Decision, ...]
    changes: tuple[Change, ...]
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"accepted": self.accepted, "reasons": list(self.reasons),
                "decisions": [d.to_json() for d in self.decisions], "changes": [c.to_json() for c in self.changes],
                "warnings": list(self.warnings)}


def _parse_vm(state: Any) -> tuple[InterfaceConfig, CpuFacts, OperatorSettings]:
    if not isinstance(state, dict):
        raise InputError("interface state: not a JSON object")
    if state.get("schema") not in READABLE:
        raise InputError(f"interface state: schema {state.get('schema')!r} is not {SCHEMA!r} (or its /1)")
    try:
        return (InterfaceConfig.from_json(state["config"]), CpuFacts.from_json(state["personality"]),
                OperatorSettings.from_json(state["settings"]))
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise InputError(f"interface state: {what}") from None


def _parse_vcpus(state: dict[str, Any], config: InterfaceConfig) -> list[dict[str, int]]:
    try:
        vcpus = state["vcpus"]
        if not isinstance(vcpus, list) or not vcpus:
            raise ValueError("vcpus must be a non-empty list")
        parsed = []
        for i, v in enumerate(vcpus):
            row = {k: v[k] for k in ("ctrl", "reported", "spec_ctrl", "forced_mask", "forced_value")}
            for k, x in row.items():
                if k == "reported":
                    if not isinstance(x, bool):
                        raise ValueError(f"vcpus[{i}].reported must be true or false")
                elif not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 1 << 64:
                    raise ValueError(f"vcpus[{i}].{k} must be a 64-bit unsigned integer")
            if row["ctrl"] & ~config.supported:
                raise ValueError(f"vcpus[{i}].ctrl {row['ctrl']:#x} has bits the VM was never offered")
            parsed.append(row)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise InputError(f"interface state: {what}") from None
    return parsed


def broken_promises(supported: int, host: CpuFacts, policy: BhiPolicy = DEFAULT_POLICY) -> tuple[str, ...]:
    """Why `host` cannot honour request bits the VM was promised in MITIGATION_ENUM (empty when it can): the guest
    read them once at boot and may report any of them later, so each must stay effective or forceable here (and
    forced under the BHI `policy`)."""
    reasons = []
    for m in Mitigation:
        if supported & m.request_bit:
            ok, why = can_honour(host, m, policy)
            if not ok:
                reasons.append(f"the VM was promised {m.title} support (MITIGATION_ENUM bit "
                               f"{int(m.request_bit).bit_length() - 1}) but this host cannot honour it: {why}")
    return tuple(reasons)


def shown_config_reasons(config: InterfaceConfig, host: CpuFacts) -> tuple[str, ...]:
    """Why `host` cannot take a VM for what its interface showed it at boot (empty when it can): LONG_BHB_NEEDED = 0
    where the short loop is too short, and a pool description that does not list this host's CPU."""
    return long_bit_reasons(config.bhb_long, host) + not_listed_reasons(config.pool, host)


@dataclass
class Prepared:
    """A destination's view of a VM, worked out before the source pauses: every decision the guest's vCPUs can
    need here (one per possible report), and whether the promised MITIGATION_ENUM bits can be honoured. Finishing
    a migration after the pause then only reads the vCPUs' final registers and looks decisions up."""

    config: InterfaceConfig
    personality: CpuFacts
    settings: OperatorSettings
    host: CpuFacts
    vm_fields: tuple[Any, Any, Any]  # config, personality, settings as they came, to spot a change later
    promise_reasons: list[str]
    decisions: dict[frozenset[Mitigation] | None, Decision]
    vm: VmInterface  # built ahead for the vCPU count in HELO; `finish` fills in the final registers


Decider = Callable[[CpuFacts, "frozenset[Mitigation] | None", CpuFacts, OperatorSettings], Decision]


Settings = OperatorSettings | PartialSettings | None
"""The destination's operator settings for a VM: None keeps the ones that travel with it, PartialSettings go over
them field by field (`PartialSettings.over`), OperatorSettings replace them whole."""


def settings_here(carried: OperatorSettings, given: Settings) -> OperatorSettings:
    """The settings a VM has on this host, from those it carries and those the destination gives."""
    if given is None:
        return carried
    if isinstance(given, PartialSettings):
        return given.over(carried)
    return given


def prepare(state: dict[str, Any], host: CpuFacts, settings: Settings = None, decider: Decider = decide) -> Prepared:
    """Parse the VM's description in `state` and decide every possible vCPU report against `host`. Pure.
    `decider` is `policy.decide` (or a memo of it: the exhaustive verifier asks the same questions many times)."""
    config, personality, carried = _parse_vm(state)
    settings = settings_here(carried, settings)  # the operator's settings travel with the VM
    reasons = (list(broken_promises(config.supported, host, settings.bhi_policy))
               + list(shown_bit_reasons(personality, host)) + list(shown_config_reasons(config, host)))
    offered = [m for m in Mitigation if config.supported & m.request_bit]
    reports: list[frozenset[Mitigation] | None] = [None] + [
        frozenset(m for j, m in enumerate(offered) if k >> j & 1) for k in range(1 << len(offered))]
    table = {r: decider(host, r, personality, settings) for r in reports}
    vcpus = state.get("vcpus")
    count = len(vcpus) if isinstance(vcpus, list) and vcpus else 1
    vm = VmInterface(config, host, personality, settings, count, decider=lambda *a: table[a[1]])
    p = Prepared(config, personality, settings, host, (state["config"], state["personality"], state["settings"]),
                 reasons, table, vm)
    p.vm.take_effects()
    return p


def _verdict(p: Prepared, vcpus: list[dict[str, int]]) -> Verdict:
    reasons = list(p.promise_reasons)
    warnings: list[str] = []
    decisions: list[Decision] = []
    changes: list[Change] = []
    for i, v in enumerate(vcpus):
        reliance = mitigations_from_bits(v["ctrl"]) if v["reported"] else None
        d = p.decisions[reliance]
        decisions.append(d)
        for e in d.exposures:
            (warnings if e.override else reasons).append(f"vCPU {i}: {e.reason}")
        for e in d.by_design:
            warnings.append(f"vCPU {i}: exposed by the BHI policy's design: {e.reason}")
        for w in d.warnings:
            warnings.append(f"vCPU {i}: {w}")
        before_on = v["forced_mask"] & v["forced_value"]
        after_on = d.mask & d.value
        if before_on == after_on:
            continue
        added = tuple(name for bit, name in _SPEC_BITS if bit & after_on & ~before_on)
        released = tuple(name for bit, name in _SPEC_BITS if bit & before_on & ~after_on)
        if added or released:
            changes.append(Change(i, added, released))
        for name in released:
            rel = next((x for x in Mitigation if x.control.name == name), None)
            why = next((n for n in d.notes if rel and n.startswith(rel.title)), "not needed here")
            warnings.append(f"vCPU {i}: {name} is no longer forced: {why}")
    return Verdict(not reasons, tuple(dict.fromkeys(reasons)), tuple(decisions), tuple(changes),
                   tuple(dict.fromkeys(warnings)))


def verdict_for(prepared: Prepared, state: dict[str, Any]) -> Verdict:
    """The verdict on `state` (the HELO before the pause) from a prepared view: what `check` answers."""
    return _verdict(prepared, _parse_vcpus(state, prepared.config))


def finish(prepared: Prepared, state: dict[str, Any]) -> tuple[Verdict, VmInterface | None]:
    """After the pause: the final `state` of a VM that `prepared` describes, decided and (if accepted) rebuilt.

    The VM's description must not have changed since `prepare`; only its vCPUs' registers may have.
    """
    if not isinstance(state, dict) or state.get("schema") not in READABLE:
        raise InputError(f"interface state: schema {state.get('schema') if isinstance(state, dict) else None!r} "
                         f"is not {SCHEMA!r} (or its /1)")
    if (state.get("config"), state.get("personality"), state.get("settings")) != prepared.vm_fields:
        raise InputError("interface state: the VM's configuration changed after the destination's check")
    vcpus = _parse_vcpus(state, prepared.config)
    vm = prepared.vm
    # the whole state is checked before anything is decided on it: a refusal must not name a vCPU the VM lacks
    if len(vcpus) != len(vm.vcpus):
        raise InputError(f"interface state: {len(vcpus)} vCPUs, but the VM was described with {len(vm.vcpus)}")
    for i, v in enumerate(vcpus):
        if v["spec_ctrl"] & ~vm.vcpus[i].spec.writable:
            raise InputError(f"interface state: vcpus[{i}].spec_ctrl {v['spec_ctrl']:#x} has bits the guest's "
                             "personality does not enumerate")
    verdict = _verdict(prepared, vcpus)
    if not verdict.accepted:
        return verdict, None
    for target, v in zip(vm.vcpus, vcpus, strict=True):
        target.ctrl, target.reported, target.spec.guest = v["ctrl"], bool(v["reported"]), v["spec_ctrl"]
    vm.redecide_all()  # every vCPU with its restored report, before the guest runs again
    return verdict, vm


def check(state: dict[str, Any], host: CpuFacts, settings: Settings = None, decider: Decider = decide) -> Verdict:
    """Would `host` take this VM? Pure: decides every vCPU against `host`, creates nothing.

    Refused when a mitigation a vCPU relies on cannot be kept effective here, when a mitigation the VM was
    promised in MITIGATION_ENUM cannot be honoured here (the guest may report it later), or when a speculation bit
    the VM was shown at boot is false here (`pvmit.pool.rule.shown_bit_reasons`: a guest shown ITS_NO moving to an
    ITS-affected host). `settings` are the
    destination operator's settings for this VM; by default the ones that travel with it.
    """
    return verdict_for(prepare(state, host, settings, decider), state)


def restore(state: dict[str, Any], host: CpuFacts, settings: Settings = None,
            decider: Decider = decide) -> tuple[Verdict, VmInterface | None]:
    """Recreate the VM's interface on `host` if `check` accepts it; (verdict, None) when refused."""
    return finish(prepare(state, host, settings, decider), state)
