"""`pvmit host`: inspect this machine."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from pvmit.cli.output import derived_table, emit_json, esc, out
from pvmit.cli.state import State, json_option, pass_state
from pvmit.host.inspect import inspect_host
from pvmit.x86.registers import CPU_FACT_REGISTERS


@click.command("host")
@json_option
@click.option("--no-kvm", is_flag=True, help="Do not open /dev/kvm.")
@pass_state
def host(st: State, json_out: bool, no_kvm: bool) -> None:
    """Inspect this host: CPU identity and speculation bits, the kernel's view, what KVM offers, and what this
    host can force for guests. Anything unreadable is reported as unknown with the reason."""
    report = inspect_host(st.catalog, with_kvm=not no_kvm)
    doc = report.to_json()
    if json_out:
        emit_json(doc)
        return
    _print(doc)


def _print(doc: dict[str, Any]) -> None:
    ident = doc["identity"]
    if ident.get("vendor_string"):
        hv = ident.get("hypervisor")
        out.print("[bold]Host CPU[/]  " + esc(
            f"{ident['brand'] or ident['vendor_string']}: {ident['vendor_string']} family {ident['family']:#x} "
            f"model {ident['model']:#x} stepping {ident['stepping']}"
            + (f"  (running under a hypervisor: {hv['signature']})" if hv else "")))
        out.print(esc(f"  CPUID read with: {ident['cpuid_method']}"))
    nm = doc.get("nearest_model")
    if nm:
        out.print("[bold]Nearest catalog model[/]  " + esc(f"{nm['id']} ({nm['name']}), {nm['match']} match"))
    facts = doc.get("facts")
    if facts:
        t = Table(title="Speculation registers")
        for col in ("register", "value", "named bits", "source / why unknown"):
            t.add_column(col)
        for reg in CPU_FACT_REGISTERS:
            r = facts["registers"][reg.key]
            if r["all_known"]:
                named = " ".join(r["set"]) + (f" unknown({r['unnamed_set']})" if r["unnamed_set"] != "0x0" else "")
                t.add_row(reg.name, r["value"], named.strip() or "-", esc(r["sources"].get("*", "")))
            else:
                t.add_row(reg.name, "unknown", "-", esc(r["unknown_reason"] or ""))
        out.print(t)
        out.print(derived_table(doc["derived"], "What this host means for guests", " here"))
    vulns = doc.get("vulnerabilities")
    if vulns:
        out.print("[bold]This kernel's view[/] (/sys/devices/system/cpu/vulnerabilities)")
        for k in ("spectre_v2", "retbleed", "spec_rstack_overflow"):
            if k in vulns:
                out.print(esc(f"  {k}: {vulns[k]}"))
    kvm = doc.get("kvm")
    if kvm:
        caps = kvm["capabilities"]
        out.print("[bold]KVM[/]  " + esc(f"{kvm['device']} API {kvm['api_version']}; ")
                  + ", ".join(f"{k.removeprefix('KVM_CAP_')}={'yes' if v else 'no'}" for k, v in caps.items()))
        ac = kvm.get("arch_capabilities_offered")
        if ac:
            out.print(esc(f"  IA32_ARCH_CAPABILITIES KVM offers guests: {ac['value']} = {' '.join(ac['bits'])}"
                          + (f" unknown({ac['unknown']})" if ac["unknown"] != "0x0" else "")))
        out.print(esc(f"  {kvm['force_spec_ctrl']}"))
    for u in doc["unknowns"]:
        out.print("[yellow]unknown[/] " + esc(f"{u['what']}: {u['reason']}"))
