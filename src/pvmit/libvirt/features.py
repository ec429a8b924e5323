"""libvirt's and QEMU's CPU feature names for the bits pvmit reads, and CPU facts from a list of such names.

The mapping is data (`data/features.toml`, every name with its source). `facts_from_features` turns what libvirt
lists for a CPU (a host's capabilities, a guest's CPU definition) into `CpuFacts`:

  a feature listed                                  the bit is 1
  a feature not listed, whose name libvirt knows    the bit is 0
  a feature whose name this libvirt does not know   unknown: libvirt cannot say (older libvirts lack the newer
                                                    names), and decisions treat it conservatively
  'arch-capabilities' not listed                    every IA32_ARCH_CAPABILITIES bit is 0: the MSR is not there
  'arch-capabilities' listed, no MSR bit listed     for a host, every IA32_ARCH_CAPABILITIES bit is unknown
                                                    (libvirt lists none when it cannot read the MSR)
  a TCG guest (<domain type='qemu'>)                none of these registers is shown (QEMU's TCG masks)
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pvmit.catalog.facts import CpuFacts, RegisterFacts, Vendor
from pvmit.x86.registers import ARCH_CAPABILITIES, CPU_FACT_REGISTERS, REGISTERS, Register

ARCH_CAPS_FEATURE = "arch-capabilities"


@dataclass(frozen=True)
class FeatureBit:
    """One named feature: libvirt's name (QEMU's where libvirt has none yet), its aliases and its bit."""

    name: str
    aliases: tuple[str, ...]
    register: Register
    bit: str
    source: str

    @property
    def mask(self) -> int:
        return self.register.bit(self.bit)


@dataclass(frozen=True, eq=False)
class FeatureMap:
    features: tuple[FeatureBit, ...]
    sources: dict[str, str]
    tcg_hidden: tuple[str, ...]  # register keys a TCG guest sees nothing of
    tcg_source: str
    by_name: dict[str, FeatureBit] = field(default_factory=dict)  # every name and alias

    def __post_init__(self) -> None:
        for f in self.features:
            for n in (f.name, *f.aliases):
                self.by_name[n] = f

    def get(self, name: str) -> FeatureBit | None:
        return self.by_name.get(name)

    def canonical(self, names: Iterable[str]) -> frozenset[str]:
        """Names as libvirt wrote them -> the mapping's names (aliases resolved); names it does not map are kept."""
        out = set()
        for n in names:
            f = self.get(n)
            out.add(f.name if f else n)
        return frozenset(out)

    def cite(self, ref: str) -> str:
        key, _, detail = ref.partition(":")
        title = self.sources.get(key.strip())
        return f"{title}: {detail.strip()}" if title and detail else title or ref


def parse_feature_map(doc: dict[str, Any], where: str) -> FeatureMap:
    """Validate the mapping document; ValueError names the entry and field."""
    sources = doc.get("sources")
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ValueError(f"{where}: [sources] must map keys to titles")

    def check_source(ref: object, what: str) -> str:
        if not isinstance(ref, str) or ref.partition(":")[0].strip() not in sources:
            raise ValueError(f"{where}: {what}: source {ref!r} does not start with a key of [sources]")
        return ref

    feats: list[FeatureBit] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(doc.get("feature", [])):
        what = f"feature #{i + 1}"
        if not isinstance(raw, dict) or set(raw) - {"name", "aliases", "register", "bit", "source"}:
            raise ValueError(f"{where}: {what}: expects name, aliases, register, bit, source")
        name, reg_key, bit = raw.get("name"), raw.get("register"), raw.get("bit")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: {what}: name must be a non-empty string")
        what = f"feature {name!r}"
        reg = REGISTERS.get(str(reg_key))
        if reg is None or reg not in CPU_FACT_REGISTERS:
            raise ValueError(f"{where}: {what}: register {reg_key!r} is not one of "
                             f"{', '.join(r.key for r in CPU_FACT_REGISTERS)}")
        try:
            reg.bit(str(bit))
        except KeyError as e:
            raise ValueError(f"{where}: {what}: {e.args[0]}") from None
        aliases = raw.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{where}: {what}: aliases must be a list of strings")
        for n in (name, *aliases):
            if n in seen:
                raise ValueError(f"{where}: {what}: name {n!r} is already used by {seen[n]!r}")
            seen[n] = name
        feats.append(FeatureBit(name, tuple(aliases), reg, str(bit), check_source(raw.get("source"), what)))
    bits = [(f.register.key, f.bit) for f in feats]
    if len(set(bits)) != len(bits):
        dup = next(b for b in bits if bits.count(b) > 1)
        raise ValueError(f"{where}: {dup[0]}.{dup[1]} is named by more than one feature")
    tcg = doc.get("tcg", {})
    hidden = tcg.get("hidden", []) if isinstance(tcg, dict) else None
    if not isinstance(hidden, list) or any(h not in {r.key for r in CPU_FACT_REGISTERS} for h in hidden):
        raise ValueError(f"{where}: [tcg] hidden must list register keys")
    return FeatureMap(tuple(feats), dict(sources), tuple(hidden), check_source(tcg.get("source"), "[tcg]"))


def _from_identity(reg: Register, vendor: Vendor, family: int, model: int, stepping: int | None,
                   where: str) -> RegisterFacts:
    from pvmit.catalog.linux_lists import blacklist_facts

    if reg.key != "linux_blacklist" or not family:
        return RegisterFacts.unknown(reg, f"{where}: no CPU identity to look {reg.name} up by")
    return blacklist_facts(vendor, family, [model], None if stepping is None else [stepping])


@lru_cache(maxsize=1)
def feature_map() -> FeatureMap:
    """The mapping shipped with pvmit."""
    text = (resources.files("pvmit.libvirt") / "data" / "features.toml").read_text(encoding="utf-8")
    return parse_feature_map(tomllib.loads(text), "pvmit/libvirt/data/features.toml")


def facts_from_features(present: Iterable[str], knows: Callable[[str], bool], *, vendor: Vendor, family: int,
                        model: int, stepping: int | None, where: str, host: bool, tcg: bool = False,
                        identity_source: str = "") -> CpuFacts:
    """The facts a feature list gives (see the module's table). `knows(name)` says whether the libvirt that wrote
    the list knows a feature name; `where` names the list in every source text; `host` is True for a host's own
    CPU (whose MSR libvirt may have failed to read) and False for what a guest is shown."""
    fm = feature_map()
    listed = fm.canonical(present)
    regs: dict[str, RegisterFacts] = {}
    for reg in CPU_FACT_REGISTERS:
        if reg.kind not in ("cpuid", "msr"):  # Linux's per-model lists: from the identity, as everywhere in pvmit
            regs[reg.key] = _from_identity(reg, vendor, family, model, stepping, where)
            continue
        if tcg and reg.key in fm.tcg_hidden:
            regs[reg.key] = RegisterFacts.exact(reg, 0, f"{where}: a TCG guest is shown none of {reg.name} "
                                                        f"({fm.cite(fm.tcg_source)})")
            continue
        value = known = 0
        sources: dict[str, str] = {}
        for f in fm.features:
            if f.register is not reg:
                continue
            if f.name in listed:
                value, known = value | f.mask, known | f.mask
                sources[f.bit] = f"{where}: '{f.name}' listed"
            elif knows(f.name) or any(knows(a) for a in f.aliases):
                known |= f.mask
                sources[f.bit] = f"{where}: '{f.name}' not listed"
        regs[reg.key] = RegisterFacts(reg, value, known, sources,
                                      f"{where}: this libvirt has no name for it, so cannot report it")
    arch = regs[ARCH_CAPABILITIES.key]
    caps_feature = fm.get(ARCH_CAPS_FEATURE)
    assert caps_feature is not None
    enum = regs[caps_feature.register.key].fact(caps_feature.bit)
    if enum.value is False and not (tcg and ARCH_CAPABILITIES.key in fm.tcg_hidden):
        regs[ARCH_CAPABILITIES.key] = RegisterFacts.exact(
            ARCH_CAPABILITIES, 0, f"{where}: '{ARCH_CAPS_FEATURE}' not listed, so IA32_ARCH_CAPABILITIES is "
                                  + ("not there" if host else "not shown"))
    elif enum.value and host and not arch.value:
        regs[ARCH_CAPABILITIES.key] = RegisterFacts.unknown(
            ARCH_CAPABILITIES, f"{where}: '{ARCH_CAPS_FEATURE}' listed but no IA32_ARCH_CAPABILITIES bit: libvirt "
                               "lists none when it cannot read the MSR, so none is relied on")
    return CpuFacts(vendor, family, model, stepping, regs, identity_source or where)
