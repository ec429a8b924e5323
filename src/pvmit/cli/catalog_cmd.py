"""`pvmit catalog list|show|check` and `pvmit decode`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from pvmit.catalog.loader import CpuModel, load_catalog
from pvmit.cli.output import derived_table, emit_json, esc, out
from pvmit.cli.params import parse_register_value
from pvmit.cli.state import State, json_option, pass_state
from pvmit.derive import (
    Mitigation,
    cpu_summary,
    need,
)
from pvmit.errors import CatalogError, InputError
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.linux.model import Cmdline, Prediction, predict
from pvmit.x86 import decode, register
from pvmit.x86.registers import CPU_FACT_REGISTERS


@click.group()
def catalog() -> None:
    """The CPU catalog: list models, show one with its facts and sources, check a file."""


@catalog.command("list")
@click.option("--vendor", help="Only this vendor: intel, amd, hygon.")
@json_option
@pass_state
def list_cmd(st: State, vendor: str | None, json_out: bool) -> None:
    """List every catalog model with its identity and QEMU name."""
    models = [m for m in st.catalog if vendor is None or m.vendor == vendor.lower()]
    if vendor and not models:
        raise InputError(f"no models of vendor {vendor!r}; vendors are intel, amd, hygon")
    if json_out:
        emit_json({"schema": "pvmit.catalog-list/1", "count": len(models),
                   "models": [m.summary_json() for m in models]})
        return
    t = Table(title=f"{len(models)} CPU models", show_lines=False)
    for col in ("id", "name", "vendor", "family/model", "µarch", "segment", "year", "QEMU model"):
        t.add_column(col)
    for m in models:
        t.add_row(m.id, esc(m.name), m.vendor, f"{m.family:#x}/{'/'.join(f'{x:#x}' for x in m.models)}",
                  esc(m.microarchitecture), m.segment, str(m.year or ""), esc(", ".join(m.qemu)))
    out.print(t)


def _show_text(p: Prediction, kernel: Kernel, m: CpuModel, cmdline: Cmdline) -> None:
    out.print(f"[bold]{esc(m.name)}[/] ({m.id})  {m.vendor} family {m.family:#x} model "
              f"{', '.join(f'{x:#x}' for x in m.models)} steppings {esc(str(list(m.steppings) or 'any'))}")
    out.print(esc(f"  {m.microarchitecture}; {', '.join(m.marketing)}; {m.segment}, {m.year or 'year unknown'}"))
    if m.qemu:
        out.print(esc(f"  QEMU model: {', '.join(m.qemu)}"))
    if m.aliases:
        out.print(esc(f"  aliases: {', '.join(m.aliases)}"))
    out.print(esc(f"  identity: {m.facts.identity_source}"))
    if m.notes:
        out.print(esc(f"  note: {m.notes}"))
    t = Table(title="Facts (bits not listed are unknown)")
    for col in ("register", "bit", "value", "source"):
        t.add_column(col)
    for reg in CPU_FACT_REGISTERS:
        rf = m.facts.reg(reg.key)
        for name in reg.bit_names():
            f = rf.fact(name)
            if f.known:
                t.add_row(reg.name, name, "1" if f.value else "0", esc(f.source))
    out.print(t)
    d = derived_table(cpu_summary(m.facts), "Derived (pvmit.derive)")
    d.add_row(esc(f"Linux {kernel.version} guest picks{' (' + str(cmdline) + ')' if str(cmdline) else ''}"),
              esc(f"{p.sysfs_mode}; {p.sysfs_bhi or 'no BHI field'}; ITS: {p.its.sysfs or 'no ITS file'}"),
              esc(p.reason))
    relies = ", ".join(sorted(x.value for x in p.relies_on)) or "nothing"
    d.add_row("guest would report", relies, "RFC: RETPOLINE_S_USED in (eibrs,)retpoline mode; BHB_CLEAR_SEQ_S_USED "
                                            "with the SW loop")
    out.print(d)


@catalog.command("show")
@click.argument("name")
@click.option("--cmdline", default="", help="Guest kernel command line for the Linux prediction.")
@click.option("--kernel", "kernel_version", default="6.18", show_default=True, metavar="VERSION",
              help="Guest kernel version for the Linux prediction (upstream, 5.10 to 6.18, such as 6.1.192).")
@json_option
@pass_state
def show_cmd(st: State, name: str, cmdline: str, kernel_version: str, json_out: bool) -> None:
    """Show model NAME (id, name, QEMU model name or alias; any case): identity, every sourced fact, and what
    pvmit derives from it."""
    m = st.catalog.get(name)
    cl = Cmdline.parse(cmdline)
    kernel = Kernel(KernelVersion.parse(kernel_version))
    p = predict(m.facts, cl, kernel=kernel)  # before any output: a version the model cannot place exits 2
    if json_out:
        doc = {"schema": "pvmit.catalog-show/1", **m.to_json(), "derived": cpu_summary(m.facts),
               "needs": {x.value: {"must_force": (n := need(m.facts, x)).must_force, "control": n.control.name,
                                   "can_force": n.can_force} for x in Mitigation},
               "linux_guest": {"cmdline": str(cl), **p.to_json()},
               "sources": {k: s.model_dump() for k, s in st.catalog.sources.items()}}
        emit_json(doc)
        return
    _show_text(p, kernel, m, cl)


@catalog.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def check_cmd(path: Path, json_out: bool) -> None:
    """Validate catalog file PATH together with the built-in catalog; exit 2 naming the first problem."""
    try:
        cat = load_catalog([path])
    except CatalogError as e:
        if json_out:
            emit_json({"schema": "pvmit.catalog-check/1", "file": str(path), "ok": False, "error": str(e)})
        raise
    mine = [m for m in cat if m.origin == str(path)]
    if json_out:
        emit_json({"schema": "pvmit.catalog-check/1", "file": str(path), "ok": True,
                   "models": [m.id for m in mine]})
        return
    out.print(esc(f"{path}: ok, {len(mine)} model(s): {', '.join(m.id for m in mine) or 'none'}"))


@click.command("decode")
@click.argument("reg", metavar="REGISTER")
@click.argument("value")
@json_option
def decode_cmd(reg: str, value: str, json_out: bool) -> None:
    """Decode raw VALUE (decimal, 0x hex, 0b binary) of REGISTER (spec_ctrl, arch_capabilities,
    cpuid_7_2_edx, ...) into named bits; bits without a name are shown as unknown."""
    try:
        r = register(reg)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    raw = parse_register_value(value, 64)
    try:
        d = decode(r, raw)
    except ValueError as e:
        raise InputError(str(e)) from None
    if json_out:
        emit_json({"schema": "pvmit.decode/1", "register": r.key, "name": r.name, "location": r.location,
                   **d.to_json()})
        return
    out.print(esc(f"{r.name} ({r.location}) = {raw:#x}: {d}"))

