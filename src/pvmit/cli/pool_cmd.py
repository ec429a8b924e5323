"""`pvmit pool`: which speculation bits a pool of hosts may show its guests, as a report or as VMM configuration."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog
from pvmit.cli.output import emit_json, esc, out, warn
from pvmit.cli.state import State, pass_state
from pvmit.errors import InputError
from pvmit.fleet.classes import Resolver
from pvmit.interface.bhi import long_bhb_needed
from pvmit.interface.pooldesc import Implementation, describe
from pvmit.pool.emit import firecracker_template, libvirt_cpu, qemu_cpu
from pvmit.pool.rule import Pool, personality_for_pool, pool_bit_table, pool_bits
from pvmit.vmm.personality import Personality
from pvmit.x86.bits import MitigationEnum

if TYPE_CHECKING:
    from pvmit.libvirt.cpumap import FileCpuMap

FORMATS = ("text", "json", "qemu", "libvirt", "firecracker")


def resolve_hosts(catalog: Catalog, names: tuple[str, ...]) -> list[tuple[str, str, CpuFacts]]:
    """(label, catalog id or '', facts) per HOST argument: a catalog model, or a `pvmit host --json` file."""
    resolver = Resolver(catalog)
    hosts = []
    for text in names:
        try:
            key, label, facts = resolver.host_cpu(text, Path.cwd())
        except ValueError as e:
            raise InputError(f"host {text!r}: {e}") from None
        hosts.append((label if key.startswith("model:") else f"{text} ({label})",
                      key.removeprefix("model:") if key.startswith("model:") else "", facts))
    return hosts


def default_base(catalog: Catalog, hosts: list[tuple[str, str, CpuFacts]],
                 defined: Callable[[str], bool] = lambda _name: True) -> str | None:
    """The QEMU/libvirt model to start from: the oldest catalog model of the pool that has a QEMU name (a host
    fact file counts as the catalog model of its identity when there is exactly one), and that `defined` accepts
    (a libvirt defines only the models of its CPU map)."""
    models = []
    for _, model_id, facts in hosts:
        if model_id:
            models.append(catalog.get(model_id))
        else:
            near = catalog.by_identity(facts.vendor, facts.family, facts.model)
            if len(near) == 1:
                models.append(near[0])
    named = [m for m in models if m.qemu_name and defined(m.qemu_name)]
    if not named:
        return None
    return min(named, key=lambda m: (m.year or 9999, m.id)).qemu_name


def pool_description(catalog: Catalog, hosts: list[tuple[str, str, CpuFacts]]) -> tuple[Implementation, ...]:
    """The pool description the VMM shows a VM of this pool (docs/interface.md section 10): a catalog model with
    every model number and stepping it covers, a host reading with its own identity."""
    cpus = []
    for _, model_id, facts in hosts:
        if model_id:
            m = catalog.get(model_id)
            cpus.append((m.vendor, m.family, m.models, m.steppings))
        else:
            cpus.append((facts.vendor, facts.family, (facts.model,), () if facts.stepping is None else
                         (facts.stepping,)))
    try:
        return describe(cpus)
    except ValueError as e:
        raise InputError(str(e)) from None


def shown_in_pool(personality: Personality, hosts: list[tuple[str, CpuFacts]]) -> Personality:
    """`personality` as a VM of a pool of `hosts` is shown it (`pool.rule.personality_for_pool`)."""
    facts = personality_for_pool(personality.facts, pool_bits(hosts))
    return dataclasses.replace(personality, facts=facts)


def qemu_flags(binary: str) -> frozenset[str]:
    """The CPUID flags a QEMU binary recognises: the words after 'Recognized CPUID flags:' in `-cpu help`."""
    try:
        done = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InputError(f"--qemu {binary}: cannot run it: {e}") from None
    text = done.stdout
    if done.returncode != 0 or "Recognized CPUID flags:" not in text:
        raise InputError(f"--qemu {binary}: `-cpu help` did not list CPUID flags (exit {done.returncode})")
    return frozenset(text.split("Recognized CPUID flags:", 1)[1].split())


def _cpu_map(directory: Path) -> FileCpuMap:
    """A libvirt CPU map directory (`pvmit.libvirt.cpumap`)."""
    from pvmit.libvirt.cpumap import CpuMapError, FileCpuMap

    try:
        return FileCpuMap(directory)
    except CpuMapError as e:
        raise InputError(f"--libvirt-cpu-map: {e}") from None


def _text(pool: Pool) -> None:
    t = Table(title=f"What a pool of {', '.join(pool.hosts)} may show its guests")
    for col in ("bit", "show", "why"):
        t.add_column(col, overflow="fold")
    for b in pool_bit_table():
        v = pool.bits[b.key]
        if b.rule == "never" or (pool.vendor is not None and b.vendor != pool.vendor):
            continue
        t.add_row(b.key, "[green]1[/]" if v.show else "0", esc(v.why))
    out.print(t)
    enum = MitigationEnum(pool.mitigation_enum)
    out.print(f"MITIGATION_ENUM {pool.mitigation_enum:#x}: "
              + (", ".join(str(b.name) for b in MitigationEnum if b & enum) or "nothing can be promised"))
    out.print("(bits KVM never passes to guests and the other vendor's registers are left out; --json has all)")


def _describe(entries: tuple[Implementation, ...], long_bit: bool) -> None:
    out.print(f"LONG_BHB_NEEDED (BHI policy long-needed-bit): {int(long_bit)}; pool description "
              f"(docs/interface.md section 10), POOL_INFO {len(entries) | 1 << 8:#x}:")
    for e in entries:
        out.print(esc(f"  {e.encode():#014x}  {e.label}"))


@click.command("pool")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text; json (as --json); qemu (a -cpu option); libvirt (a <cpu> element); firecracker (a custom "
                   "CPU template).")
@click.option("--json", "json_out", is_flag=True, help="Write one JSON document (as --format json).")
@click.option("--base", default=None, metavar="MODEL",
              help="QEMU/libvirt CPU model to start from (default: the pool's oldest catalog model with one).")
@click.option("--qemu", "qemu_binary", default=None, metavar="PATH",
              help="With --format qemu: emit only the flags this qemu-system-x86_64 knows (its -cpu help).")
@click.option("--libvirt-cpu-map", "cpu_map_dir", default=None, metavar="DIR", type=click.Path(path_type=Path),
              help="With --format libvirt: emit only the model and feature names this libvirt CPU map defines "
                   "(/usr/share/libvirt/cpu_map on the libvirt host): a libvirt refuses a <cpu> naming others.")
@pass_state
def pool(st: State, hosts: tuple[str, ...], fmt: str, json_out: bool, base: str | None,
         qemu_binary: str | None, cpu_map_dir: Path | None) -> int:
    """Compute which bits of IA32_ARCH_CAPABILITIES and the speculation CPUID leaves a pool of HOSTs (catalog
    models, or files `pvmit host --json` wrote) may show its guests: each must stay true on every host a VM can
    reach. Also MITIGATION_ENUM for the pool, LONG_BHB_NEEDED and the pool description a VMM shows its VMs
    (docs/interface.md sections 9 and 10), and the result as QEMU, libvirt or Firecracker configuration."""
    if json_out:
        fmt = "json"
    resolved = resolve_hosts(st.catalog, hosts)
    result = pool_bits([(label, facts) for label, _, facts in resolved])
    for w in result.warnings:
        warn(w)
    entries = pool_description(st.catalog, resolved)
    long_bit = long_bhb_needed(facts for _, _, facts in resolved)
    if fmt == "text":
        _text(result)
        _describe(entries, long_bit)
        return 0
    if fmt == "json":
        doc = result.to_json()
        doc["base_model"] = base or default_base(st.catalog, resolved)
        doc["long_bhb_needed"] = long_bit
        doc["pool_description"] = {"pool_info": len(entries) | 1 << 8, "entries": [e.to_json() for e in entries]}
        emit_json(doc)
        return 0
    if fmt == "firecracker":
        template, warnings = firecracker_template(result, [(label, facts) for label, _, facts in resolved])
        for w in warnings:
            warn(w)
        out.file.write(json.dumps(template, indent=2) + "\n")
        return 0
    cpu_map = _cpu_map(cpu_map_dir) if cpu_map_dir is not None and fmt == "libvirt" else None
    defined: Callable[[str], bool] = (lambda m: cpu_map.model(m) is not None) if cpu_map else (lambda _m: True)
    model = base or default_base(st.catalog, resolved, defined)
    if model is None:
        raise InputError("no host of the pool is a catalog model with a QEMU name"
                         + (f" that {cpu_map.where} defines" if cpu_map else "") + ": give --base MODEL")
    if cpu_map is not None and not defined(model):
        raise InputError(f"--base {model}: {cpu_map.where} defines no such model")
    known = qemu_flags(qemu_binary) if qemu_binary and fmt == "qemu" else None
    emitted = qemu_cpu(result, model, known) if fmt == "qemu" else \
        libvirt_cpu(result, model, cpu_map.knows if cpu_map else None)
    for w in emitted.warnings:
        warn(w)
    if emitted.unexpressed:
        warn(f"{fmt} has no name for {', '.join(emitted.unexpressed)}: those stay as {model} shows them")
    out.file.write(emitted.text if fmt == "libvirt" else emitted.text + "\n")
    return 0
