"""CPU personalities: what a guest is shown, as data (in the spirit of Firecracker's CPU templates).

A personality starts from a catalog model's facts (bits no source gives are not shown), may override named bits,
and may apply Firecracker-style CPUID bitmaps last. `build_cpuid` turns it, with the interface form the VM offers,
into the CPUID table given to KVM. Templates are TOML files (src/pvmit/vmm/personalities/ holds pvmit's own):

    name = "icelake-server-v2"
    base = "icelake-sp"                       # catalog model; optional when vendor, family and model are given
    description = "QEMU Icelake-Server-v2: no IA32_ARCH_CAPABILITIES"
    [registers]                               # optional: whole registers exactly as the guest sees them
    cpuid_7_2_edx = 0x0
    [show]                                    # register.bit = shown or not (applied after [registers])
    "cpuid_7_0_edx.ARCH_CAPABILITIES" = false
    [[cpuid]]                                 # optional, applied last; MSB first, 0/1 force a bit, x keeps it
    leaf = 0x7
    subleaf = 0
    register = "edx"
    bitmap = "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from pvmit.catalog.facts import VENDOR_IDS, CpuFacts, RegisterFacts
from pvmit.catalog.loader import Catalog
from pvmit.errors import InputError, UnknownModelError
from pvmit.interface.forms import (
    CpuidLeaf,
    Form,
    InterfaceConfig,
    kvm_feature_leaf_bits,
    kvm_hint_bits,
    neutral_leaves,
)
from pvmit.kvm.system import CpuidEntry
from pvmit.userfiles import MiB, load_toml, read_text
from pvmit.x86.bits import Cpuid7_0Edx
from pvmit.x86.registers import CPU_FACT_REGISTERS, KVM_CPUID_FEATURES, KVM_CPUID_SIGNATURE, REGISTERS

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1
TEMPLATE_CAP = 1 * MiB
"""Largest personality template read (pvmit's own are under 1 KiB)."""


@dataclass(frozen=True)
class CpuidModifier:
    leaf: int
    subleaf: int
    register: str
    set_mask: int
    clear_mask: int


@dataclass(frozen=True)
class Personality:
    """What a guest is shown: identity and speculation bits (`facts`), plus raw CPUID modifiers."""

    name: str
    facts: CpuFacts
    origin: str
    description: str = ""
    modifiers: tuple[CpuidModifier, ...] = ()

    @property
    def arch_capabilities(self) -> int:
        return self.facts.reg("arch_capabilities").value

    def to_json(self) -> dict[str, object]:
        """Everything a migration destination needs to show the guest the same CPU."""
        return {"name": self.name, "origin": self.origin, "description": self.description,
                "facts": self.facts.to_json(),
                "modifiers": [{"leaf": m.leaf, "subleaf": m.subleaf, "register": m.register, "set": m.set_mask,
                               "clear": m.clear_mask} for m in self.modifiers]}

    @classmethod
    def from_json(cls, doc: object) -> Personality:
        """ValueError names what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("personality: expected an object")
        mods = []
        for i, m in enumerate(doc.get("modifiers", [])):
            try:
                mod = CpuidModifier(int(m["leaf"]), int(m["subleaf"]), str(m["register"]), int(m["set"]),
                                    int(m["clear"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"personality: modifiers[{i}] is malformed") from None
            if mod.register not in ("eax", "ebx", "ecx", "edx"):
                raise ValueError(f"personality: modifiers[{i}].register {mod.register!r}")
            mods.append(mod)
        return cls(str(doc.get("name", "?")), CpuFacts.from_json(doc.get("facts")), str(doc.get("origin", "")),
                   str(doc.get("description", "")), tuple(mods))


def from_model(catalog: Catalog, name: str) -> Personality:
    m = catalog.get(name)
    return Personality(m.id, m.facts, f"catalog model {m.id}", m.name)


def _bitmap(text: str, where: str) -> tuple[int, int]:
    body = text[2:] if text.startswith("0b") else ""
    if len(body) != 32 or not re.fullmatch(r"[01x]+", body):
        raise InputError(f"{where}: bitmap must be '0b' and 32 characters of 0, 1 or x (MSB first), got {text!r}")
    set_mask = clear_mask = 0
    for i, ch in enumerate(reversed(body)):
        if ch == "1":
            set_mask |= 1 << i
        elif ch == "0":
            clear_mask |= 1 << i
    return set_mask, clear_mask


def load_template(catalog: Catalog, path: str | Path, text: str | None = None) -> Personality:
    """Read a personality template; errors name the file and the field."""
    where = str(path)
    doc = load_toml(text if text is not None else read_text(path, "personality template", TEMPLATE_CAP), where)
    unknown = set(doc) - {"name", "base", "description", "show", "cpuid", "vendor", "family", "model", "stepping",
                          "registers"}
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}")
    if not isinstance(doc.get("name"), str):
        raise InputError(f"{where}: field 'name' must be a string")
    if "base" in doc:
        if not isinstance(doc["base"], str):
            raise InputError(f"{where}: field 'base' must be a string")
        try:
            facts = catalog.get(doc["base"]).facts
        except UnknownModelError as e:
            raise InputError(f"{where}: field 'base': {e}") from None
    elif {"vendor", "family", "model"} <= set(doc):  # a CPU the catalog does not describe (QEMU's qemu64)
        facts = CpuFacts("intel", 0, 0, None, {}, f"personality {where}")
    else:
        raise InputError(f"{where}: give 'base' (a catalog model) or 'vendor', 'family' and 'model'")
    regs = dict(facts.registers)
    exact = doc.get("registers", {})
    if not isinstance(exact, dict):
        raise InputError(f"{where}: [registers] must be a table of register = value")
    for key, value in exact.items():
        reg = REGISTERS.get(key)
        if reg is None or reg not in CPU_FACT_REGISTERS:
            raise InputError(f"{where}: registers.{key}: unknown register; known: "
                             f"{', '.join(r.key for r in CPU_FACT_REGISTERS)}")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= reg.mask:
            raise InputError(f"{where}: registers.{key} must be an unsigned {reg.width}-bit integer")
        regs[key] = RegisterFacts.exact(reg, value, f"personality {where}")
    show = doc.get("show", {})
    if not isinstance(show, dict):
        raise InputError(f"{where}: [show] must be a table of register.bit = true/false")
    for key, value in show.items():
        reg_key, _, bit = key.partition(".")
        reg = REGISTERS.get(reg_key)
        if reg is None or reg not in CPU_FACT_REGISTERS:
            raise InputError(f"{where}: show.{key}: unknown register {reg_key!r}")
        try:
            mask = reg.bit(bit)
        except KeyError as e:
            raise InputError(f"{where}: show.{key}: {e.args[0]}") from None
        if not isinstance(value, bool):
            raise InputError(f"{where}: show.{key} must be true or false")
        rf = regs.get(reg_key) or RegisterFacts(reg)
        regs[reg_key] = RegisterFacts(reg, (rf.value & ~mask) | (mask if value else 0), rf.known | mask,
                                      {**rf.sources, bit: f"personality {where}"}, rf.unknown_reason,
                                      rf.inferred & ~mask)
    ident: dict[str, Any] = {}
    for field, bits in (("family", 12), ("model", 8), ("stepping", 8)):
        if field in doc:
            v = doc[field]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << bits:
                raise InputError(f"{where}: field {field!r} must be an integer below {1 << bits}")
            ident[field] = v
    if "vendor" in doc:
        if doc["vendor"] not in VENDOR_IDS:
            raise InputError(f"{where}: field 'vendor' must be one of {', '.join(VENDOR_IDS)}")
        ident["vendor"] = doc["vendor"]
    facts = replace(facts, registers=regs, **ident)
    mods = []
    for i, m in enumerate(doc.get("cpuid", [])):
        w = f"{where}: cpuid[{i}]"
        if not isinstance(m, dict) or set(m) - {"leaf", "subleaf", "register", "bitmap"}:
            raise InputError(f"{w}: expects leaf, subleaf, register and bitmap")
        if m.get("register") not in ("eax", "ebx", "ecx", "edx"):
            raise InputError(f"{w}: register must be eax, ebx, ecx or edx")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32
                   for v in (m.get("leaf"), m.get("subleaf", 0))):
            raise InputError(f"{w}: leaf and subleaf must be unsigned 32-bit integers")
        set_mask, clear_mask = _bitmap(str(m.get("bitmap", "")), w)
        mods.append(CpuidModifier(m["leaf"], m.get("subleaf", 0), m["register"], set_mask, clear_mask))
    return Personality(doc["name"], facts, where, str(doc.get("description", "")), tuple(mods))


def builtin_templates(catalog: Catalog) -> dict[str, Personality]:
    out = {}
    folder = resources.files("pvmit.vmm") / "personalities"
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".toml"):
            t = load_template(catalog, f"pvmit/vmm/personalities/{p.name}", p.read_text(encoding="utf-8"))
            out[t.name.lower()] = t
    return out


def resolve(catalog: Catalog, name: str, templates: dict[str, Personality] | None = None) -> Personality:
    """A personality by name: a template file path, a built-in template, or a catalog model. `templates`: the
    built-in ones, when the caller has them already (the fleet planner resolves many names)."""
    if name.endswith(".toml"):
        return load_template(catalog, name)
    templates = builtin_templates(catalog) if templates is None else templates
    if name.lower() in templates:
        return templates[name.lower()]
    try:
        return from_model(catalog, name)
    except UnknownModelError as e:
        raise UnknownModelError(f"{e}; built-in personalities: {', '.join(sorted(templates))}") from None


def _shown(facts: CpuFacts, key: str) -> int:
    return facts.reg(key).value  # only bits known set are shown


def build_cpuid(p: Personality, config: InterfaceConfig | None, base: list[CpuidEntry]) -> list[CpuidEntry]:
    """The CPUID table for a guest: KVM's supported table (`base`) with the personality's identity and
    speculation bits, the interface's enumeration for `config`, then the template's raw modifiers."""
    f = p.facts
    table: dict[tuple[int, int], list[int]] = {}
    flags: dict[tuple[int, int], int] = {}
    for e in base:
        table[(e.function, e.index)] = [e.eax, e.ebx, e.ecx, e.edx]
        flags[(e.function, e.index)] = e.flags

    def regs(leaf: int, sub: int = 0) -> list[int]:
        if (leaf, sub) not in table:
            table[(leaf, sub)] = [0, 0, 0, 0]
            flags[(leaf, sub)] = KVM_CPUID_FLAG_SIGNIFICANT_INDEX if leaf in (7, 0xD) else 0
        return table[(leaf, sub)]

    idx = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}
    b, d, c = struct.unpack("<3I", VENDOR_IDS[f.vendor].encode())
    r0 = regs(0)
    r0[1], r0[2], r0[3] = b, c, d
    family, model = f.family, f.model
    base_family, ext_family = (family, 0) if family < 0xF else (0xF, family - 0xF)
    sig = ((ext_family & 0xFF) << 20) | (((model >> 4) & 0xF) << 16) | ((base_family & 0xF) << 8) | \
        ((model & 0xF) << 4) | ((f.stepping or 0) & 0xF)
    regs(1)[0] = sig
    r0[0] = max(r0[0], 7)
    for reg in CPU_FACT_REGISTERS:
        if reg.kind != "cpuid":
            continue
        named = sum(int(m) for m in reg.layout)
        r = regs(reg.index, reg.subleaf)
        r[idx[reg.out]] = (r[idx[reg.out]] & ~named) | _shown(f, reg.key)
    if _shown(f, "cpuid_7_2_edx"):
        regs(7, 0)[0] = max(regs(7, 0)[0], 2)  # max subleaf of leaf 7
    if _shown(f, "cpuid_80000021_eax") or _shown(f, "cpuid_80000021_ecx"):
        regs(0x80000000)[0] = max(regs(0x80000000)[0], 0x80000021)
    if config is not None and config.form is Form.INTEL:
        regs(7, 0)[3] |= int(Cpuid7_0Edx.ARCH_CAPABILITIES)  # emulated for AMD guests too
    if config is not None:
        kvm_sig = regs(KVM_CPUID_SIGNATURE)
        if kvm_sig[1:] == [0, 0, 0]:
            kvm_sig[:] = [KVM_CPUID_FEATURES, *struct.unpack("<3I", b"KVMKVMKVM\0\0\0")]
        regs(KVM_CPUID_FEATURES)[0] |= kvm_feature_leaf_bits(config)
        regs(KVM_CPUID_FEATURES)[3] |= kvm_hint_bits(config)
        if config.form is Form.NEUTRAL:
            for leaf in neutral_leaves(config):
                table[(leaf.leaf, 0)] = [leaf.eax, leaf.ebx, leaf.ecx, leaf.edx]
                flags[(leaf.leaf, 0)] = 0
    for m in p.modifiers:
        r = regs(m.leaf, m.subleaf)
        r[idx[m.register]] = (r[idx[m.register]] & ~m.clear_mask) | m.set_mask
    return [CpuidEntry(leaf, sub, flags[(leaf, sub)], *vals) for (leaf, sub), vals in sorted(table.items())]


__all__ = ["CpuidLeaf", "CpuidModifier", "Personality", "build_cpuid", "from_model", "load_template", "resolve"]
