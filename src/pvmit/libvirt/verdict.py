"""May a libvirt domain move to a host? Decided by the fleet planner, on a one-host, one-VM inventory.

The hook, `pvmit libvirt check` and `pvmit libvirt inventory` describe libvirt's hosts and domains as inventory rows
(`host_row`, `vm_row`); the verdict is then the planner's own (`fleet.classes.collapse`, `fleet.plan.plan`): `decide`
for the controls a destination forces and the exposures it leaves, `broken_promises` for MITIGATION_ENUM, as
`interface.state.check` answers a migration. Nothing here restates those rules. What is added is only what the
stack itself implies:

  safe      allowed
  forced    allowed only where the hypervisor forces controls for guests (`hypervisor_forces`); stock QEMU/KVM
            does not, so the guest would not keep its protection there
  exposed   refused, unless an operator setting caused the exposure (`check` accepts that: the operator chose it)
  unknown   the XML or the host could not be understood: `on_unknown` decides (refuse by default)

`mode = "warn"` allows every migration but reports the same verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.errors import PvmitError
from pvmit.fleet.classes import Resolver, collapse
from pvmit.fleet.inventory import SCHEMA, mitigations_label, read_document
from pvmit.fleet.plan import Verdict, plan
from pvmit.libvirt.config import HookConfig
from pvmit.libvirt.cpumap import CpuMap
from pvmit.libvirt.facts import Unknowable, guest_personality
from pvmit.libvirt.parse import XmlError, domain
from pvmit.libvirt.record import GuestReading, parse_record
from pvmit.vmm.personality import Personality

UNKNOWN = "unknown"


def host_row(name: str, cpu: str | dict[str, Any], settings: dict[str, str] | None = None) -> dict[str, Any]:
    """An inventory host row: `cpu` is a catalog model, a facts file, or facts as JSON (`CpuFacts.to_json`)."""
    return {"name": name, "cpu": cpu, **(settings or {})}


def vm_row(name: str, host: str, personality: Personality, relies_on: frozenset[Mitigation] | None,
           settings: dict[str, str] | None = None) -> dict[str, Any]:
    """An inventory VM row for a libvirt domain: QEMU offers no pvmit interface, so the VM never reports; what its
    kernel relies on, where it was read in the guest, goes in relies_on."""
    row: dict[str, Any] = {"name": name, "host": host, "personality": personality.to_json(),
                           "mitigations": "unenlightened", "form": "none"}
    if relies_on is not None:
        row["relies_on"] = mitigations_label(relies_on)
    return {**row, **(settings or {})}


def document(hosts: list[dict[str, Any]], vms: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "hosts": hosts, "vms": vms, **extra}


@dataclass(frozen=True)
class Answer:
    """The verdict on one migration, with everything it was decided from."""

    allowed: bool
    verdict: str  # safe, forced, exposed, unknown
    reasons: tuple[str, ...]
    forced: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    decided_by: str = "policy"  # policy, on_unknown, mode warn
    vm: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)

    def message(self, domain_name: str) -> str:
        """What the hook prints for libvirt to show the operator (first line) and the reasons."""
        head = {"safe": "keeps its protection", "forced": "would need IA32_SPEC_CTRL controls forced",
                "exposed": "would be left exposed", UNKNOWN: "cannot be decided"}[self.verdict]
        act = "allowed" if self.allowed else "refused"
        by = "" if self.decided_by == "policy" else f" ({self.decided_by})"
        lines = [f"pvmit: migration of {domain_name} {act}{by}: it {head} on this host"]
        lines += [f"  {r}" for r in self.reasons] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {"allowed": self.allowed, "verdict": self.verdict, "decided_by": self.decided_by,
                "reasons": list(self.reasons), "forced": list(self.forced), "warnings": list(self.warnings),
                "vm": self.vm, "host": self.host}


def _unknown(config: HookConfig, why: str, vm: dict[str, Any], host: dict[str, Any]) -> Answer:
    allowed = config.on_unknown == "allow" or config.mode == "warn"
    by = f"on_unknown = {config.on_unknown}" + (", mode = warn" if config.mode == "warn" else "")
    return Answer(allowed, UNKNOWN, (why,), decided_by=by, vm=vm, host=host)


def judge(domain_xml: str, host_name: str, host_cpu: str | dict[str, Any] | None, host_why: str,
          cpumap: CpuMap, catalog: Catalog, config: HookConfig) -> Answer:
    """The verdict on moving the domain `domain_xml` describes to `host_name`, whose CPU is `host_cpu` (a catalog
    model, a facts file, facts as JSON, or None when it could not be read: `host_why` says why or how it was read)."""
    host_info: dict[str, Any] = {"name": host_name, "cpu": host_why}
    vm_info: dict[str, Any] = {}
    try:
        dom = domain(domain_xml)
        vm_info["name"] = dom.name
        record = parse_record(dom.metadata, f"domain {dom.name}")
    except XmlError as e:
        return _unknown(config, str(e), vm_info, host_info)
    reading: GuestReading | None = record.reading
    vm_info["relies_on"] = reading.to_json() if reading else "never read: judged by its unreported setting"
    if host_cpu is None:
        return _unknown(config, f"this host's CPU: {host_why}", vm_info, host_info)
    try:
        personality = guest_personality(dom, cpumap, catalog)
    except Unknowable as e:
        if dom.cpu.mode != "host-passthrough" or config.passthrough != "this-host":
            return _unknown(config, f"{e}: neither what it relies on nor the bits it was shown can be checked "
                                    "against this host", vm_info, host_info)
        try:  # the operator's word: passthrough guests move only between hosts with this CPU
            _key, _label, facts = Resolver(catalog).host_cpu(
                host_cpu if isinstance(host_cpu, str) else json.dumps(host_cpu), Path("."))
        except ValueError as err:
            return _unknown(config, f"this host's CPU: {err}", vm_info, host_info)
        personality = Personality("host-passthrough (taken as this host's CPU)", facts, f"domain {dom.name} XML",
                                  "host-passthrough, shown its source host's CPU: taken as this host's "
                                  "(passthrough = this-host)")
    vm_info["personality"] = {"name": personality.name, "description": personality.description}
    doc = document([host_row(host_name, host_cpu, config.settings)],
                   [vm_row(dom.name, host_name, personality, reading.relies_on if reading else None,
                           record.settings)])
    try:
        fleet = collapse(read_document(doc, f"migration of {dom.name}", Path(".")), Resolver(catalog))
    except PvmitError as e:
        return _unknown(config, str(e), vm_info, host_info)
    if fleet.errors or not fleet.num_vms:
        errs = "; ".join(f"{e.table} field {e.field}: {e.message}" for e in fleet.errors.first(5))
        return _unknown(config, errs or "the VM could not be described", vm_info, host_info)
    p = plan(fleet)
    move = p.moves[int(p.move_of[0, 0])]
    verdict = Verdict(int(p.verdict[0, 0]))
    host_info["class"] = fleet.host_classes[0].label
    vm_info["class"] = fleet.vm_classes[0].label
    reasons = list(move.reasons) + [f"assumed (unknown, taken conservatively): {a}" for a in move.assumed]
    if verdict is Verdict.SAFE:
        allowed = True
    elif verdict is Verdict.FORCED:
        allowed = config.hypervisor_forces
        if not allowed:
            reasons.append(f"this host's hypervisor does not force IA32_SPEC_CTRL controls for guests "
                           f"(hypervisor_forces = false): {', '.join(move.forced)} would not be held")
    else:
        allowed = move.accepted  # an exposure an operator setting caused is the operator's choice
    by = "policy"
    if not allowed and config.mode == "warn":
        allowed, by = True, "mode = warn"
    return Answer(allowed, verdict.word, tuple(reasons), move.forced, move.warnings, by, vm_info, host_info)


def log_line(answer: Answer, domain_name: str, when: str, extra: dict[str, Any] | None = None) -> str:
    return json.dumps({"time": when, "domain": domain_name, **answer.to_json(), **(extra or {})})
