"""The host personality a VMM decides for: this machine as it really is, or a catalog model standing in."""

from __future__ import annotations

from pvmit.catalog.loader import Catalog
from pvmit.errors import PvmitError
from pvmit.host.cpuid import open_cpuid
from pvmit.host.inspect import nearest_model, read_cpu_facts, reconcile
from pvmit.vmm.vmm import Host


def this_machine(catalog: Catalog) -> tuple[Host, list[str]]:
    """This machine's real facts (CPUID executed, reconciled conservatively), and notes on what was adjusted."""
    cpuid, problems = open_cpuid()
    if cpuid is None:
        raise PvmitError("cannot execute CPUID here: " + "; ".join(problems))
    unknowns: list[dict[str, str]] = []
    identity, reading = read_cpu_facts(cpuid, unknowns)
    near = nearest_model(catalog, reading)
    exact = catalog.get(near["id"]) if near and near["match"] == "exact" else None
    facts, notes = reconcile(reading, exact, identity["hypervisor"] is not None)
    name = f"this machine ({identity['brand'] or identity['vendor_string']}" + (
        f", {near['id']}" if near and near["match"] == "exact" else "") + ")"
    return Host(name, facts, facts, stand_in=False), notes + [f"{u['what']}: {u['reason']}" for u in unknowns]


def stand_in(catalog: Catalog, model: str, real: Host) -> Host:
    """A catalog model standing in for another host; hardware application still follows `real`."""
    m = catalog.get(model)
    return Host(f"{m.name} ({m.id}, stand-in)", m.facts, real.real, stand_in=True)
