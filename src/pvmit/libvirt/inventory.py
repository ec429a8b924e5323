"""`pvmit libvirt inventory` and `pvmit libvirt record`: a fleet inventory from libvirt connections, and what each
guest relies on written into its domain's metadata for the migration hook.

Hosts come from their capabilities (`facts.host_facts`), VMs from their running domains' live XML (the CPU exactly
as libvirt started it, with the features QEMU could not give turned to policy='disable'), what each guest relies on
from its own spectre_v2 line through the QEMU guest agent, or, where the agent does not answer, from what was
recorded in its metadata before; otherwise it is left unknown, with the reason, and the policy judges the VM by its
`unreported` setting. The document is an ordinary inventory (`pvmit fleet plan` reads it) with a `libvirt` section
saying where every value came from.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.fleet.inventory import mitigations_label
from pvmit.libvirt.agent import GuestLines, read_guest, reliance
from pvmit.libvirt.connection import Connection, LibvirtError, binding
from pvmit.libvirt.facts import Unknowable, guest_personality, host_facts
from pvmit.libvirt.features import feature_map
from pvmit.libvirt.parse import XmlError, domain, host_cpu
from pvmit.libvirt.record import GuestReading, Record, parse_record
from pvmit.libvirt.verdict import document, host_row, vm_row
from pvmit.vmm.personality import Personality

Say = Callable[[str], None]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Gathered:
    hosts: list[dict[str, Any]] = field(default_factory=list)
    vms: list[dict[str, Any]] = field(default_factory=list)
    host_info: list[dict[str, Any]] = field(default_factory=list)
    vm_info: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return document(self.hosts, self.vms, libvirt={
            "generated_at": now(), "hosts": self.host_info, "vms": self.vm_info, "errors": self.errors,
            "warnings": self.warnings})


def _guest(c: Connection, dom: Any, record: Record, agent: bool, timeout: int
           ) -> tuple[frozenset[Mitigation] | None, dict[str, Any]]:
    """What the guest relies on, and the account of how that was learned."""
    info: dict[str, Any] = {}
    lines = GuestLines(error="not asked (--no-agent)")
    if agent:
        lines = read_guest(c.agent(dom, timeout))
    info["agent"] = lines.to_json()
    r = reliance(lines)
    if r.relies_on is not None:
        info.update(relies_on=mitigations_label(r.relies_on), source="qemu-guest-agent", read_at=now(),
                    reasons=list(r.why), assumed=list(r.assumed))
        return r.relies_on, info
    if record.reading is not None:
        rd = record.reading
        info.update(relies_on=mitigations_label(rd.relies_on), source=f"recorded in its metadata ({rd.source})",
                    read_at=rd.read_at, reasons=[f"the agent: {'; '.join(r.why)}"])
        return rd.relies_on, info
    info.update(relies_on=None, source=None,
                unknown=f"{'; '.join(r.why)}; nothing recorded in its metadata: judged by its unreported setting")
    return None, info


def _host(c: Connection, catalog: Catalog, g: Gathered, say: Say) -> tuple[str, Any]:
    name = c.hostname
    if any(h["name"] == name for h in g.hosts):
        name = f"{name}@{c.uri}"
        g.warnings.append(f"{c.uri}: another connection's host is also called {c.hostname!r}: named {name!r}")
    cpu = host_cpu(c.capabilities())
    features = c.expand(cpu.xml) | frozenset(cpu.features) if cpu.model else frozenset(cpu.features)
    where = f"libvirt capabilities of {name}"
    facts, notes = host_facts(cpu, features, c.cpumap, catalog, where)
    g.hosts.append(host_row(name, facts.to_json()))
    listed = sorted(f for f in features if feature_map().get(f))
    g.host_info.append({"name": name, "uri": c.uri, "libvirt": c.version, "cpu": {
        "model": cpu.model, "vendor": cpu.vendor, "family": cpu.family, "model_number": cpu.model_number,
        "stepping": cpu.stepping, "microcode": cpu.microcode, "speculation_features": listed},
        "notes": notes})
    say(f"{name}: {cpu.vendor} {cpu.model} family {cpu.family} model {cpu.model_number} stepping {cpu.stepping}"
        f" ({c.uri}, libvirt {c.version})")
    return name, facts


def gather(uris: list[str], catalog: Catalog, *, agent: bool = True, timeout: int = 5,
           say: Say = lambda _m: None) -> Gathered:
    """The inventory of every running domain on every connection. A connection that fails is reported in `errors`
    and the others are still read."""
    binding()  # without it nothing can be read: say so once, rather than once per host
    g = Gathered()
    seen: dict[str, str] = {}
    for uri in uris:
        try:
            with Connection(uri) as c:
                host, facts = _host(c, catalog, g, say)
                for dom in c.running_domains():
                    _vm(c, dom, host, facts, catalog, g, seen, agent, timeout, say)
        except (LibvirtError, XmlError, ValueError) as e:
            g.errors.append(str(e))
    return g


def _vm(c: Connection, dom: Any, host: str, host_facts_: Any, catalog: Catalog, g: Gathered,
        seen: dict[str, str], agent: bool, timeout: int, say: Say) -> None:
    try:
        d = domain(c.xml(dom))
        record = parse_record(d.metadata, f"domain {d.name} on {host}")
    except (XmlError, LibvirtError) as e:
        g.errors.append(f"{host}: domain {dom.name()}: {e}")
        return
    name = d.name if d.name not in seen else f"{d.name}@{host}"
    if name != d.name:
        g.warnings.append(f"{host}: a domain called {d.name!r} also runs on {seen[d.name]}: named {name!r}")
    seen.setdefault(d.name, host)
    info: dict[str, Any] = {"name": name, "domain": d.name, "host": host, "uri": c.uri, "uuid": d.uuid,
                            "type": d.virt_type, "cpu": {"mode": d.cpu.mode, "model": d.cpu.model,
                                                         "features": [f"{p} {n}" for p, n in d.cpu.features
                                                                      if feature_map().get(n)]}}
    try:
        personality = guest_personality(d, c.cpumap, catalog)
    except Unknowable as e:
        if d.cpu.mode != "host-passthrough":
            g.warnings.append(f"{e}: left out of the inventory")
            info["left_out"] = str(e)
            g.vm_info.append(info)
            return
        personality = Personality(f"host-passthrough on {host}", host_facts_, f"domain {d.name} XML",
                                  f"host-passthrough: the CPU of {host} as libvirt reports it")
    info["personality"] = {"name": personality.name, "description": personality.description}
    relied, info["guest"] = _guest(c, dom, record, agent, timeout)
    g.vms.append(vm_row(name, host, personality, relied, record.settings))
    g.vm_info.append(info)
    say(f"  {name}: {personality.description}; relies on "
        f"{mitigations_label(relied) if relied is not None else 'unknown'}"
        f"{' (' + info['guest']['source'] + ')' if info['guest'].get('source') else ''}")


@dataclass(frozen=True)
class Recorded:
    domain: str
    written: bool
    relies_on: str | None
    source: str
    why: str = ""

    def to_json(self) -> dict[str, object]:
        return {"domain": self.domain, "written": self.written, "relies_on": self.relies_on, "source": self.source,
                "why": self.why}


def record_guests(uri: str | None, names: list[str], *, relies_on: frozenset[Mitigation] | None,
                  settings: dict[str, str], timeout: int = 5) -> list[Recorded]:
    """Write what each running domain's guest relies on (read through its agent, or `relies_on` as the operator
    gives it) and `settings` into its metadata; a guest whose agent does not answer keeps what was recorded before."""
    out = []
    with Connection(uri) as c:
        doms = [c.domain(n) for n in names] if names else c.running_domains()
        for dom in doms:
            d = domain(c.xml(dom))
            old = parse_record(d.metadata, f"domain {d.name}")
            if relies_on is not None:
                reading: GuestReading | None = GuestReading(relies_on, "operator", now())
                why = "given by the operator"
            else:
                lines = read_guest(c.agent(dom, timeout))
                r = reliance(lines)
                reading = None if r.relies_on is None else GuestReading(
                    r.relies_on, "qemu-guest-agent", now(), lines.vulnerabilities.get("spectre_v2"), lines.cmdline)
                why = "; ".join(r.why)
            new = Record(reading or old.reading, {**old.settings, **settings})
            if reading is None and new == old:
                out.append(Recorded(d.name, False, None, "", f"nothing recorded: {why}"))
                continue
            c.write_record(dom, new)
            r_ = new.reading
            out.append(Recorded(d.name, True, mitigations_label(r_.relies_on) if r_ else None,
                                r_.source if r_ else "", why if reading else f"settings only; the agent: {why}"))
    return out
