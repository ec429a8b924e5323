"""A pool's bits as the configuration three VMMs take: a QEMU `-cpu` option, a libvirt `<cpu>` element and a
Firecracker custom CPU template. Pure: a `Pool` in, text or JSON-ready data out.

Names come from x86/data/feature_names.toml (QEMU target/i386/cpu.c feature_word_info; libvirt
src/cpu_map/x86_features.xml), the table pvmit also reads libvirt's CPUs by, so what it writes it reads back.
A bit a tool has no name for cannot be set or cleared there; `unexpressed` lists those the pool decides, so the
operator knows what the tool's base model leaves as it is. Firecracker takes raw bitmaps, so every decided bit is
expressed there (docs/cpu_templates/schema.json: `0b[01x]{32}` for CPUID registers, `0b[01x]{64}` for MSRs; `x`
leaves a bit as KVM gives it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pvmit.catalog.facts import CpuFacts
from pvmit.pool.rule import Pool, PoolBit, pool_bit_table
from pvmit.x86.registers import REGISTERS

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # Linux uapi/asm/kvm.h: the leaf is indexed by subleaf (leaf 7)


@dataclass(frozen=True)
class Emitted:
    """Text for a tool, and what it could not say."""

    text: str
    unexpressed: tuple[str, ...]  # pool bit keys the tool has no name for
    warnings: tuple[str, ...] = ()


def _decided(pool: Pool) -> list[PoolBit]:
    """The bits of the pool's vendor that the pool rule decides (never-rule bits are left to the VMM)."""
    if pool.vendor is None:
        return []
    return [b for b in pool_bit_table() if b.rule != "never" and b.vendor == pool.vendor]


def qemu_cpu(pool: Pool, base: str, known: frozenset[str] | None = None) -> Emitted:
    """`-cpu BASE,+flag,-flag,...`: every decided bit QEMU names, set or cleared as the pool decides. `known`: the
    flags a given QEMU binary recognises (`-cpu help`); others are left out (a QEMU that cannot name a bit never
    shows it, so leaving it out can only hide a bit) and said in the warnings."""
    flags, missing, older = [], [], []
    for b in _decided(pool):
        if not b.qemu:
            missing.append(b.key)
            continue
        if known is not None and b.qemu not in known:
            older.append(b.qemu)
            continue
        flags.append(("+" if pool.bits[b.key].show else "-") + b.qemu)
    warnings = (f"this QEMU does not know {', '.join(older)}: left out (it shows none of them)",) if older else ()
    return Emitted("-cpu " + ",".join([base, *flags]), tuple(missing), warnings)


def libvirt_cpu(pool: Pool, base: str, knows: Callable[[str], bool] | None = None) -> Emitted:
    """A libvirt domain `<cpu>` element: the base model, and each decided bit cpu_map names required or disabled.
    `knows`: whether the libvirt that will read it knows a feature name (its CPU map, `pvmit.libvirt.cpumap`); a
    libvirt refuses a whole definition that names a feature it does not know, so those are left out (they stay as
    the base model shows them) and said in the warnings."""
    cpu = ET.Element("cpu", {"mode": "custom", "match": "exact", "check": "partial"})
    ET.SubElement(cpu, "model", {"fallback": "forbid"}).text = base
    missing, older = [], []
    for b in _decided(pool):
        if not b.libvirt:
            missing.append(b.key)
            continue
        if knows is not None and not knows(b.libvirt):
            older.append(b.libvirt)
            continue
        ET.SubElement(cpu, "feature", {"policy": "require" if pool.bits[b.key].show else "disable",
                                       "name": b.libvirt})
    ET.indent(cpu)
    warnings = (f"this libvirt does not know {', '.join(older)}: left out (they stay as {base} shows them)",) \
        if older else ()
    return Emitted(ET.tostring(cpu, encoding="unicode") + "\n", tuple(missing), warnings)


def _bitmap(width: int, decided: int, shown: int) -> str:
    return "0b" + "".join("x" if not decided >> i & 1 else "1" if shown >> i & 1 else "0"
                          for i in range(width - 1, -1, -1))


def firecracker_template(pool: Pool, hosts: Sequence[tuple[str, CpuFacts]] = ()) -> tuple[dict[str, object],
                                                                                            tuple[str, ...]]:
    """A Firecracker custom CPU template (PUT /cpu-config) that shows exactly the pool's decided bits, and warnings
    about hosts on which Firecracker would refuse it (it refuses a modifier for a CPUID leaf or MSR the host lacks:
    src/vmm/src/cpu_config/x86_64/mod.rs apply_template_to_cpuid, CpuidFeatureNotSupported)."""
    by_reg: dict[str, tuple[int, int]] = {}
    for b in _decided(pool):
        decided, shown = by_reg.get(b.register.key, (0, 0))
        by_reg[b.register.key] = (decided | b.mask, shown | (b.mask if pool.bits[b.key].show else 0))
    cpuid: dict[tuple[int, int], dict[str, object]] = {}
    msrs = []
    warnings = []
    for key, (decided, shown) in by_reg.items():
        reg = REGISTERS[key]
        if reg.kind == "msr":
            msrs.append({"addr": f"{reg.index:#x}", "bitmap": _bitmap(reg.width, decided, shown)})
            continue
        leaf = cpuid.setdefault((reg.index, reg.subleaf), {
            "leaf": f"{reg.index:#x}", "subleaf": f"{reg.subleaf:#x}",
            "flags": KVM_CPUID_FLAG_SIGNIFCANT_INDEX if reg.index == 7 else 0, "modifiers": []})
        leaf["modifiers"].append({"register": reg.out, "bitmap": _bitmap(reg.width, decided, shown)})  # type: ignore[attr-defined]
        lacking = [name for name, facts in hosts
                   if facts.reg(key).known & decided == decided and not facts.reg(key).value & decided]
        if lacking and (reg.index, reg.subleaf) in ((7, 2), (0x80000021, 0)):
            warnings.append(f"CPUID leaf {reg.index:#x} subleaf {reg.subleaf} reads 0 on {', '.join(lacking)}: if "
                            "that host's CPUID lacks the leaf, Firecracker refuses the template there "
                            "(CpuidFeatureNotSupported); give such hosts a template without that modifier, which "
                            "shows the same bits (all 0)")
    template = {"cpuid_modifiers": [cpuid[k] for k in sorted(cpuid)], "msr_modifiers": msrs}
    return template, tuple(dict.fromkeys(warnings))
