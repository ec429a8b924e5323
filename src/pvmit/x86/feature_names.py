"""QEMU's and libvirt's names for the guest-visible speculation bits: one table, `data/feature_names.toml`.

Both directions use it: `pvmit pool --format qemu|libvirt` writes these names (`pvmit.pool.emit`, through
`pvmit.pool.rule.PoolBit`), and pvmit reads libvirt hosts' and domains' CPUs by them (`pvmit.libvirt.features`).
One copy, so a name pvmit writes is one it reads back. Each name carries its source; a bit no tool names is listed
with the reason, so that "no name" is a recorded fact, never an omission.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pvmit.x86.registers import CPU_FACT_REGISTERS, REGISTERS, Register

WHERE = "pvmit/x86/data/feature_names.toml"


@dataclass(frozen=True)
class FeatureName:
    """One named bit: QEMU's name (libvirt's too, where its CPU map has it), older spellings, the bit, the source."""

    name: str
    aliases: tuple[str, ...]
    register: Register
    bit: str
    source: str
    not_in_libvirt: str = ""  # why libvirt's CPU map has no such feature yet; "" where it has

    @property
    def mask(self) -> int:
        return self.register.bit(self.bit)

    @property
    def qemu(self) -> str:
        """The name QEMU takes (`-cpu ...,+name`)."""
        return self.name

    @property
    def libvirt(self) -> str:
        """The name libvirt's CPU map defines for this bit; "" where it defines none yet."""
        return "" if self.not_in_libvirt else self.name


@dataclass(frozen=True)
class Unnamed:
    """Bits that neither QEMU nor libvirt names, and why (a source)."""

    register: Register
    bits: tuple[str, ...]
    why: str


def source_ref(sources: Mapping[str, str], ref: object, where: str, what: str) -> str:
    """`ref` if it is 'KEY: detail' (or 'KEY') with KEY one of `sources`; else ValueError naming where and what."""
    if not isinstance(ref, str) or ref.partition(":")[0].strip() not in sources:
        raise ValueError(f"{where}: {what}: source {ref!r} does not start with a key of [sources]")
    return ref


def cite(sources: Mapping[str, str], ref: str) -> str:
    """'KEY: detail' -> 'title of KEY: detail' (the reference itself where KEY is not a source)."""
    key, _, detail = ref.partition(":")
    title = sources.get(key.strip())
    return f"{title}: {detail.strip()}" if title and detail else title or ref


@dataclass(frozen=True, eq=False)
class FeatureNames:
    features: tuple[FeatureName, ...]
    unnamed: tuple[Unnamed, ...]
    sources: dict[str, str]
    by_name: dict[str, FeatureName] = field(default_factory=dict)  # every name and alias
    by_bit: dict[tuple[str, str], FeatureName] = field(default_factory=dict)  # (register key, bit name)

    def __post_init__(self) -> None:
        for f in self.features:
            self.by_bit[(f.register.key, f.bit)] = f
            for n in (f.name, *f.aliases):
                self.by_name[n] = f

    def get(self, name: str) -> FeatureName | None:
        """The feature a name or alias stands for."""
        return self.by_name.get(name)

    def of_bit(self, register_key: str, bit: str) -> FeatureName | None:
        """The feature that names this bit; None where no tool names it."""
        return self.by_bit.get((register_key, bit))

    def why_unnamed(self, register_key: str, bit: str) -> str | None:
        """Why no tool names this bit, where the table says so."""
        return next((u.why for u in self.unnamed if u.register.key == register_key and bit in u.bits), None)

    def canonical(self, names: Iterable[str]) -> frozenset[str]:
        """Names as libvirt wrote them -> the table's names (aliases resolved); names it does not map are kept."""
        out = set()
        for n in names:
            f = self.get(n)
            out.add(f.name if f else n)
        return frozenset(out)

    def cite(self, ref: str) -> str:
        return cite(self.sources, ref)


def _register(where: str, what: str, key: object) -> Register:
    reg = REGISTERS.get(str(key))
    if reg is None or reg not in CPU_FACT_REGISTERS:
        raise ValueError(f"{where}: {what}: register {key!r} is not one of "
                         f"{', '.join(r.key for r in CPU_FACT_REGISTERS)}")
    return reg


def _bit(where: str, what: str, reg: Register, bit: object) -> str:
    try:
        reg.bit(str(bit))
    except KeyError as e:
        raise ValueError(f"{where}: {what}: {e.args[0]}") from None
    return str(bit)


def parse_feature_names(doc: dict[str, Any], where: str) -> FeatureNames:
    """Validate the table's document; ValueError names the entry and field."""
    sources = doc.get("sources")
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ValueError(f"{where}: [sources] must map keys to titles")

    def check_source(ref: object, what: str) -> str:
        return source_ref(sources, ref, where, what)

    feats: list[FeatureName] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(doc.get("feature", [])):
        what = f"feature #{i + 1}"
        if not isinstance(raw, dict) or set(raw) - {"name", "aliases", "register", "bit", "source", "not_in_libvirt"}:
            raise ValueError(f"{where}: {what}: expects name, aliases, register, bit, source, not_in_libvirt")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: {what}: name must be a non-empty string")
        what = f"feature {name!r}"
        reg = _register(where, what, raw.get("register"))
        bit = _bit(where, what, reg, raw.get("bit"))
        aliases = raw.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{where}: {what}: aliases must be a list of strings")
        for n in (name, *aliases):
            if n in seen:
                raise ValueError(f"{where}: {what}: name {n!r} is already used by {seen[n]!r}")
            seen[n] = name
        missing = raw.get("not_in_libvirt")
        feats.append(FeatureName(name, tuple(aliases), reg, bit, check_source(raw.get("source"), what),
                                 "" if missing is None else check_source(missing, f"{what}: not_in_libvirt")))
    bits = [(f.register.key, f.bit) for f in feats]
    if len(set(bits)) != len(bits):
        dup = next(b for b in bits if bits.count(b) > 1)
        raise ValueError(f"{where}: {dup[0]}.{dup[1]} is named by more than one feature")
    named, unnamed_bits = set(bits), set[tuple[str, str]]()
    unnamed: list[Unnamed] = []
    for i, raw in enumerate(doc.get("unnamed", [])):
        what = f"unnamed #{i + 1}"
        if not isinstance(raw, dict) or set(raw) != {"register", "bits", "why"} \
                or not isinstance(raw["bits"], list) or not raw["bits"]:
            raise ValueError(f"{where}: {what}: expects register, bits (a non-empty list) and why")
        reg = _register(where, what, raw["register"])
        for b in raw["bits"]:
            key = (reg.key, _bit(where, what, reg, b))
            if key in named:
                raise ValueError(f"{where}: {what}: {reg.key}.{b} is named by a feature, so not unnamed")
            if key in unnamed_bits:
                raise ValueError(f"{where}: {what}: {reg.key}.{b} is listed as unnamed twice")
            unnamed_bits.add(key)
        unnamed.append(Unnamed(reg, tuple(raw["bits"]), check_source(raw["why"], f"{what}: why")))
    return FeatureNames(tuple(feats), tuple(unnamed), dict(sources))


@lru_cache(maxsize=1)
def feature_names() -> FeatureNames:
    """The table shipped with pvmit."""
    text = (resources.files("pvmit.x86") / "data" / "feature_names.toml").read_text(encoding="utf-8")
    return parse_feature_names(tomllib.loads(text), WHERE)
