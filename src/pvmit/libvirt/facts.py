"""CPU facts from what libvirt says: a host's from its capabilities, a guest's personality from its domain XML.

Host: the features libvirt lists (its model's, expanded, plus those beyond it) through `features.facts_from_features`;
then the reading is made safe to decide from exactly as `pvmit host` makes its own (`host.inspect.reconcile`: a 0
where 0 is the unsafe answer is trusted only when nothing contradicts it); then bits libvirt cannot report at all
(names it does not know, such as RRSBA, which QEMU does not expose) are taken from the catalog model with this CPU's
exact signature, each citing it, and stay unknown where the catalog has no such model.

Guest: what the guest is shown: the model's features as libvirt defines it, plus features required, less those
disabled; what a TCG guest is not shown (`data/tcg.toml`); identity from the catalog model with that QEMU
name, else from libvirt's signature for the model. A CPU pvmit cannot know from the XML (host-passthrough, or a model
this libvirt does not define) raises `Unknowable`: deciding it is the operator's setting, never a guess.
"""

from __future__ import annotations

from dataclasses import replace

from pvmit.catalog.facts import CpuFacts, RegisterFacts, Vendor
from pvmit.catalog.loader import Catalog, CpuModel
from pvmit.errors import UnknownModelError
from pvmit.host.inspect import nearest_model, reconcile
from pvmit.libvirt.cpumap import VENDORS, CpuMap
from pvmit.libvirt.features import facts_from_features, feature_map
from pvmit.libvirt.parse import DISABLING, ENABLING, Domain, HostCpu
from pvmit.vmm.personality import Personality
from pvmit.x86.registers import CPU_FACT_REGISTERS

DEFAULT_MODEL = "qemu64"
"""The CPU QEMU gives an x86-64 guest whose domain has no <cpu> (target/i386/cpu.h TARGET_DEFAULT_CPU_TYPE is
X86_CPU_TYPE_NAME("qemu64") for TARGET_X86_64)."""


class Unknowable(Exception):
    """What the guest was shown cannot be known from the XML; the message says why."""


def exact_catalog_model(catalog: Catalog, facts: CpuFacts) -> CpuModel | None:
    """The catalog model with this CPU's vendor, family, model and stepping, if there is one."""
    near = nearest_model(catalog, facts)
    return catalog.get(near["id"]) if near and near["match"] == "exact" else None


def fill_from_catalog(facts: CpuFacts, model: CpuModel | None) -> tuple[CpuFacts, list[str]]:
    """Bits `facts` leaves unknown, taken from the catalog `model` where it knows them (each citing it)."""
    if model is None:
        return facts, []
    regs = dict(facts.registers)
    notes = []
    for reg in CPU_FACT_REGISTERS:
        mine, theirs = facts.reg(reg.key), model.facts.reg(reg.key)
        take = theirs.known & ~mine.known
        if not take:
            continue
        sources = dict(mine.sources)
        for name in reg.bit_names():
            if reg.bit(name) & take:
                f = theirs.fact(name)
                sources[name] = f"catalog {model.id} (this CPU's signature): {f.source}"
                notes.append(f"{reg.name}.{name}: not reported by libvirt; catalog {model.id} says "
                             f"{int(bool(f.value))}")
        regs[reg.key] = RegisterFacts(reg, mine.value | (theirs.value & take), mine.known | take, sources,
                                      mine.unknown_reason, mine.inferred | (theirs.inferred & take))
    return replace(facts, registers=regs), notes


def host_facts(cpu: HostCpu, features: frozenset[str], cpumap: CpuMap, catalog: Catalog,
               where: str) -> tuple[CpuFacts, list[str]]:
    """A host's facts from its capabilities' CPU; `features` are all it has (its model's, expanded, and the rest).
    Returns the facts and notes on what was adjusted or filled in. ValueError when the vendor is not x86's."""
    vendor = VENDORS.get(cpu.vendor or "")
    if vendor is None:
        raise ValueError(f"{where}: host CPU vendor {cpu.vendor!r} is not one of {', '.join(VENDORS)}")
    notes = []
    if cpu.family is None or cpu.model_number is None:
        notes.append(f"{where}: no CPU signature in the capabilities (libvirt before 7.x?): the CPU cannot be "
                     "matched to a catalog model")
    reading = facts_from_features(features, cpumap.knows, vendor=vendor, family=cpu.family or 0,
                                  model=cpu.model_number or 0, stepping=cpu.stepping, where=where, host=True,
                                  identity_source=f"{where}: signature")
    exact = exact_catalog_model(catalog, reading) if cpu.family is not None else None
    facts, adjusted = reconcile(reading, exact, under_hypervisor="hypervisor" in features)
    facts, filled = fill_from_catalog(facts, exact)
    return facts, notes + adjusted + filled


def _identity(catalog: Catalog, model: str, cpumap: CpuMap, vendor_text: str | None
              ) -> tuple[Vendor, int, int, int | None, str]:
    try:
        m = catalog.get(model)
        return m.vendor, m.family, m.models[0], m.steppings[0] if m.steppings else None, \
            f"catalog {m.id} (QEMU model {model})"
    except UnknownModelError:
        pass
    info = cpumap.model(model)
    vendor = (info.vendor if info else None) or VENDORS.get(vendor_text or "")
    sig = info.signature if info else None
    why = f"{cpumap.where}: model {model}" + ("" if sig else " (no signature)")
    if vendor is None:
        vendor, why = "intel", why + "; no vendor: taken as Intel, whose rules are the stricter"
    if sig is None:
        return vendor, 0, 0, None, why
    return vendor, sig[0], sig[1], sig[2], why


def guest_personality(dom: Domain, cpumap: CpuMap, catalog: Catalog) -> Personality:
    """What the guest of `dom` is shown, from its XML. Unknowable when the XML cannot say."""
    cpu = dom.cpu
    tcg = dom.virt_type == "qemu"
    model = cpu.model
    if cpu.mode == "default":
        model = DEFAULT_MODEL
    elif cpu.mode == "maximum" and tcg:
        model = None  # QEMU's 'max' under TCG: identity below, speculation registers all hidden
    elif cpu.mode in ("host-passthrough", "maximum") or model is None:
        raise Unknowable(f"domain {dom.name}: CPU mode {cpu.mode}{' with no model' if model is None else ''}: the "
                         "guest was shown its source host's CPU, which its XML does not describe")
    where = f"domain {dom.name}"
    if model is None:
        facts = facts_from_features((), lambda _n: True, vendor="intel", family=0, model=0, stepping=None,
                                    where=where, host=False, tcg=True, identity_source=f"{where}: QEMU max (TCG)")
        return Personality(f"libvirt maximum (TCG) of {dom.name}", facts, f"{where} XML",
                           "QEMU's 'max' CPU under TCG")
    info = cpumap.model(model)
    if info is None:
        raise Unknowable(f"{where}: CPU model {model!r} is not defined in {cpumap.where}")
    fm = feature_map()
    shown = fm.canonical(info.features | cpu.with_policy(*ENABLING)) - fm.canonical(cpu.with_policy(*DISABLING))
    optional = fm.canonical(cpu.with_policy("optional"))  # shown only if the host has it: unknown here

    def knows(name: str) -> bool:
        return cpumap.knows(name) and not fm.canonical([name]) & optional

    vendor, family, number, stepping, ident = _identity(catalog, model, cpumap, cpu.vendor)
    facts = facts_from_features(shown - optional, knows,
                                vendor=vendor, family=family, model=number, stepping=stepping,
                                where=f"{where}: CPU {model}", host=False, tcg=tcg, identity_source=ident)
    changed = sorted(f"{'+' if p in ENABLING else '-' if p in DISABLING else '?'}{n}" for p, n in cpu.features
                     if fm.get(n) is not None)  # the changes that matter here
    desc = f"libvirt {cpu.mode} CPU {model}" + (f" {' '.join(changed)}" if changed else "") + (" under TCG" if tcg
                                                                                              else "")
    return Personality(f"{model}{' (TCG)' if tcg else ''}{' with changes' if changed else ''}", facts,
                       f"{where} XML", desc)
