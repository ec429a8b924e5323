"""Loading and looking up the CPU catalog: the built-in data files plus any an operator names.

Every entry is validated on load; the first problem raises `CatalogError` naming the file, the entry and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pvmit.catalog.facts import CpuFacts, RegisterFacts, Vendor
from pvmit.catalog.linux_lists import blacklist_facts
from pvmit.catalog.schema import CpuEntryIn, SourceIn
from pvmit.errors import CatalogError, UnknownModelError
from pvmit.safetext import quoted
from pvmit.userfiles import FileError, MiB, load_toml, read_text
from pvmit.x86.registers import ARCH_CAPABILITIES, CPU_FACT_REGISTERS, CPUID_7_0_EDX


@dataclass(frozen=True)
class CpuModel:
    """A named CPU model of the catalog with its sourced facts."""

    id: str
    name: str
    vendor: Vendor
    family: int
    models: tuple[int, ...]
    steppings: tuple[int, ...]
    microarchitecture: str
    marketing: tuple[str, ...]
    segment: str
    year: int | None
    qemu: tuple[str, ...]
    aliases: tuple[str, ...]
    notes: str
    origin: str
    facts: CpuFacts

    @property
    def qemu_name(self) -> str | None:
        return self.qemu[0] if self.qemu else None

    def lookup_names(self) -> Iterator[str]:
        yield self.id
        yield self.name
        yield from self.qemu
        yield from self.aliases

    def summary_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "vendor": self.vendor,
            "family": self.family,
            "model": [f"{m:#04x}" for m in self.models],
            "steppings": list(self.steppings),
            "microarchitecture": self.microarchitecture,
            "marketing": list(self.marketing),
            "segment": self.segment,
            "year": self.year,
            "qemu": list(self.qemu),
            "aliases": list(self.aliases),
        }

    def to_json(self) -> dict[str, object]:
        return {**self.summary_json(), "notes": self.notes, "origin": self.origin, "facts": self.facts.to_json()}


def _norm(name: str) -> str:
    """Lookup key: case-insensitive, '_' and ' ' read as '-'."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


@dataclass(frozen=True)
class Catalog:
    models: tuple[CpuModel, ...]
    sources: dict[str, SourceIn]

    def __iter__(self) -> Iterator[CpuModel]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def get(self, name: str) -> CpuModel:
        """Find a model by id, name, QEMU model name (any -vN version) or alias, case-insensitively."""
        key = _norm(name)
        for m in self.models:
            if any(_norm(n) == key for n in m.lookup_names()):
                return m
        version = re.fullmatch(r"(.+)-v\d+", key)
        if version and any(version[1] == _norm(q) for m in self.models for q in m.qemu):
            raise UnknownModelError(
                f"{quoted(name)} is a version of a QEMU CPU model; the catalog describes the hardware, not what each "
                f"QEMU version shows a guest: name {quoted(version[1])} instead")
        close = [m.id for m in self.models if key and (key in m.id or key in _norm(m.name))]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `pvmit catalog list` shows every model"
        raise UnknownModelError(f"no CPU model named {quoted(name)} in the catalog{hint}")

    def by_identity(self, vendor: str, family: int, model: int) -> list[CpuModel]:
        return [m for m in self.models if m.vendor == vendor and m.family == family and model in m.models]

    def cite(self, source: str) -> str:
        """Expand 'KEY: detail' into the full title of the source."""
        key, _, detail = source.partition(":")
        s = self.sources.get(key.strip())
        if s is None:
            return source
        return f"{s.title}{' ' + s.url if s.url else ''}{': ' + detail.strip() if detail else ''}"


def _format_loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) if loc else "(entry)"


CATALOG_FILE_CAP = 4 * MiB
"""Largest catalog file read (the built-in ones together are under 40 KiB)."""


def _read_toml(path: str, text: str) -> dict[str, Any]:
    try:
        return load_toml(text, path)
    except FileError as e:  # found by fuzzing: nesting deeper than the parser's recursion limit; huge integers
        raise CatalogError(str(e)) from None


def _entry_label(i: int, raw: Any) -> str:
    ident = raw.get("id") if isinstance(raw, dict) else None
    return f"cpu entry #{i + 1}" + (f" (id {ident!r})" if ident else "")


def _parse_file(path: str, text: str) -> tuple[dict[str, SourceIn], list[tuple[str, CpuEntryIn]]]:
    data = _read_toml(path, text)
    unknown_top = set(data) - {"sources", "cpu"}
    if unknown_top:
        raise CatalogError(f"{path}: unknown top-level key(s) {sorted(unknown_top)}; expected [sources.*] and [[cpu]]")
    sources: dict[str, SourceIn] = {}
    raw_sources = data.get("sources", {})
    if not isinstance(raw_sources, dict):
        raise CatalogError(f"{path}: [sources] must be a table of tables")
    for key, raw in raw_sources.items():
        try:
            sources[key] = SourceIn.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise CatalogError(f"{path}: source {key!r}: field {_format_loc(err['loc'])}: {err['msg']}") from None
    raw_cpus = data.get("cpu", [])
    if not isinstance(raw_cpus, list):
        raise CatalogError(f"{path}: 'cpu' must be an array of tables ([[cpu]])")
    entries = []
    for i, raw in enumerate(raw_cpus):
        label = _entry_label(i, raw)
        try:
            entries.append((label, CpuEntryIn.model_validate(raw)))
        except ValidationError as e:
            err = e.errors()[0]
            raise CatalogError(f"{path}: {label}: field {_format_loc(err['loc'])}: {err['msg']}") from None
    return sources, entries


def _build_model(path: str, label: str, e: CpuEntryIn, sources: dict[str, SourceIn]) -> CpuModel:
    def check_source(field: str, ref: str) -> None:
        key = ref.partition(":")[0].strip()
        if key not in sources:
            raise CatalogError(
                f"{path}: {label}: field {field}: source {key!r} is not defined in any [sources] table"
            )

    check_source("identity_source", e.identity_source)
    registers: dict[str, RegisterFacts] = {}
    for reg in CPU_FACT_REGISTERS:
        table: dict[str, Any] = getattr(e, reg.key)
        value = known = inferred = 0
        cites: dict[str, str] = {}
        for bit, fact in table.items():
            try:
                mask = reg.bit(bit)
            except KeyError:
                raise CatalogError(
                    f"{path}: {label}: field {reg.key}.{bit}: {reg.name} has no bit named {bit!r}; "
                    f"known bits: {', '.join(reg.bit_names())}"
                ) from None
            check_source(f"{reg.key}.{bit}.source", fact.source)
            known |= mask
            value |= mask if fact.value else 0
            inferred |= mask if fact.inferred or fact.unverified else 0
            cites[bit] = fact.source
        registers[reg.key] = RegisterFacts(reg, value, known, cites, inferred=inferred)
    if e.vendor != "intel" and registers["arch_capabilities"].value:
        raise CatalogError(f"{path}: {label}: field arch_capabilities: only Intel CPUs have IA32_ARCH_CAPABILITIES")
    registers["cpuid_7_0_edx"] = _implied_enumeration(path, label, registers)
    registers["linux_blacklist"] = _with_linux_blacklist(registers["linux_blacklist"], e)
    facts = CpuFacts(e.vendor, e.family, e.model[0], e.steppings[0] if e.steppings else None, registers,
                     e.identity_source)
    return CpuModel(
        e.id, e.name, e.vendor, e.family, tuple(e.model), tuple(e.steppings), e.microarchitecture,
        tuple(e.marketing), e.segment, e.year, tuple(e.qemu), tuple(e.aliases), e.notes, path, facts,
    )


_IMPLIED = (
    # (CPUID.(7,0).EDX bit, implied when this IA32_ARCH_CAPABILITIES bit mask has a bit known set, why)
    ("ARCH_CAPABILITIES", ARCH_CAPABILITIES.mask,
     "implied: IA32_ARCH_CAPABILITIES bits are known, and the MSR exists only where CPUID.(7,0).EDX[29]=1"),
    ("SPEC_CTRL", ARCH_CAPABILITIES.bit("IBRS_ALL"),
     "implied: enhanced IBRS (IBRS_ALL) is a mode of IBRS, enumerated by CPUID.(7,0).EDX[26]"),
)


def _implied_enumeration(path: str, label: str, registers: dict[str, RegisterFacts]) -> RegisterFacts:
    """Fill CPUID.(7,0).EDX bits that known IA32_ARCH_CAPABILITIES facts imply; refuse a contradiction."""
    arch, edx = registers["arch_capabilities"], registers["cpuid_7_0_edx"]
    value, known, sources = edx.value, edx.known, dict(edx.sources)
    for bit, trigger, why in _IMPLIED:
        if not arch.value & trigger:
            continue
        mask = CPUID_7_0_EDX.bit(bit)
        if known & mask and not value & mask:
            raise CatalogError(f"{path}: {label}: field cpuid_7_0_edx.{bit}: is false, but known "
                               f"arch_capabilities bits imply it ({why.removeprefix('implied: ')})")
        if not known & mask:
            value, known, sources[bit] = value | mask, known | mask, why
    return RegisterFacts(CPUID_7_0_EDX, value, known, sources, inferred=edx.inferred)


def _with_linux_blacklist(given: RegisterFacts, e: CpuEntryIn) -> RegisterFacts:
    """Linux's cpu_vuln_blacklist flags for the entry's identity (every model and stepping it lists), under the
    bits the entry gives itself."""
    table = blacklist_facts(e.vendor, e.family, e.model, e.steppings)
    known = table.known | given.known
    value = (table.value & ~given.known) | given.value
    sources = {**{b: table.fact(b).source for b in given.register.bit_names() if table.known & given.register.bit(b)},
               **given.sources}
    return RegisterFacts(given.register, value, known, sources, table.unknown_reason, given.inferred)


def builtin_files() -> list[tuple[str, str]]:
    """(name, text) of the catalog files shipped with pvmit, in a stable order."""
    data = resources.files("pvmit.catalog") / "data"
    return [
        (f"pvmit/catalog/data/{p.name}", p.read_text(encoding="utf-8"))
        for p in sorted(data.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".toml")
    ]


def load_catalog(extra: Iterable[str | Path] = (), *, builtin: bool = True) -> Catalog:
    """The built-in catalog (unless builtin=False) plus operator files; ids and lookup names must stay unique."""
    files = builtin_files() if builtin else []
    for p in extra:
        try:
            files.append((str(p), read_text(p, "catalog file", CATALOG_FILE_CAP)))
        except FileError as e:
            raise CatalogError(str(e)) from None
    parsed = [(name, *_parse_file(name, text)) for name, text in files]
    sources: dict[str, SourceIn] = {}
    for name, file_sources, _ in parsed:
        for key, s in file_sources.items():
            if key in sources and sources[key] != s:
                raise CatalogError(f"{name}: source {key!r} is already defined differently in another file")
            sources[key] = s
    models: list[CpuModel] = []
    seen: dict[str, str] = {}
    for name, _, entries in parsed:
        for label, entry in entries:
            model = _build_model(name, label, entry, sources)
            for n in set(map(_norm, model.lookup_names())):
                if n in seen:
                    raise CatalogError(f"{name}: {label}: field id/name/qemu/aliases: {n!r} already names {seen[n]}")
                seen[n] = f"{model.id} ({name})"
            models.append(model)
    return Catalog(tuple(models), sources)
