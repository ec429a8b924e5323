"""libvirt's and QEMU's CPU feature names for the bits pvmit reads, and CPU facts from a list of such names.

The names are one table shared with `pvmit pool`'s emitter (`pvmit.x86.feature_names`, every name with its
source), so a name pvmit writes is one it reads back; what only this reader needs (what a TCG guest is shown) is
data too, `data/tcg.toml`. `facts_from_features` turns what libvirt lists for a CPU (a host's capabilities, a
guest's CPU definition) into `CpuFacts`:

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
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from pvmit.catalog.facts import CpuFacts, RegisterFacts, Vendor
from pvmit.x86.feature_names import FeatureName, FeatureNames, cite, feature_names, source_ref
from pvmit.x86.registers import ARCH_CAPABILITIES, CPU_FACT_REGISTERS, Register

ARCH_CAPS_FEATURE = "arch-capabilities"


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """The names libvirt's CPUs are read by (the shared table) and what a TCG guest is shown."""

    names: FeatureNames
    sources: dict[str, str]  # the table's sources and data/tcg.toml's
    tcg_hidden: tuple[str, ...]  # register keys a TCG guest sees nothing of
    tcg_source: str

    @property
    def features(self) -> tuple[FeatureName, ...]:
        return self.names.features

    def get(self, name: str) -> FeatureName | None:
        return self.names.get(name)

    def canonical(self, names: Iterable[str]) -> frozenset[str]:
        """Names as libvirt wrote them -> the table's names (aliases resolved); names it does not map are kept."""
        return self.names.canonical(names)

    def cite(self, ref: str) -> str:
        return cite(self.sources, ref)


def parse_feature_map(doc: dict[str, Any], where: str, names: FeatureNames | None = None) -> FeatureMap:
    """Validate the reader's own document (data/tcg.toml: [sources], [tcg]) on top of the shared names table
    (`names`, the shipped one by default); ValueError names the entry and field."""
    names = feature_names() if names is None else names
    if set(doc) - {"sources", "tcg"}:
        raise ValueError(f"{where}: expects [sources] and [tcg] only (names are in the shared table)")
    own = doc.get("sources", {})
    if not isinstance(own, dict) or not all(isinstance(v, str) for v in own.values()):
        raise ValueError(f"{where}: [sources] must map keys to titles")
    if clash := sorted(k for k in own if k in names.sources and own[k] != names.sources[k]):
        raise ValueError(f"{where}: [sources] {', '.join(clash)} already means something else in the names table")
    sources = {**names.sources, **own}
    tcg = doc.get("tcg", {})
    hidden = tcg.get("hidden", []) if isinstance(tcg, dict) else None
    if not isinstance(hidden, list) or any(h not in {r.key for r in CPU_FACT_REGISTERS} for h in hidden):
        raise ValueError(f"{where}: [tcg] hidden must list register keys")
    return FeatureMap(names, sources, tuple(hidden), source_ref(sources, tcg.get("source"), where, "[tcg]"))


def _from_identity(reg: Register, vendor: Vendor, family: int, model: int, stepping: int | None,
                   where: str) -> RegisterFacts:
    from pvmit.catalog.linux_lists import blacklist_facts

    if reg.key != "linux_blacklist" or not family:
        return RegisterFacts.unknown(reg, f"{where}: no CPU identity to look {reg.name} up by")
    return blacklist_facts(vendor, family, [model], None if stepping is None else [stepping])


@lru_cache(maxsize=1)
def feature_map() -> FeatureMap:
    """The names and TCG masks shipped with pvmit."""
    text = (resources.files("pvmit.libvirt") / "data" / "tcg.toml").read_text(encoding="utf-8")
    return parse_feature_map(tomllib.loads(text), "pvmit/libvirt/data/tcg.toml")


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
