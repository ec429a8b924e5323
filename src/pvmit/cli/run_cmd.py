"""`pvmit run`: boot the test guest on KVM with a CPU personality, offering one form of the interface."""

from __future__ import annotations

import click

from pvmit.cli.output import emit_json, esc, out
from pvmit.cli.params import parse_register_value
from pvmit.cli.policy_cmd import operator_options, parse_uses, settings_from_options
from pvmit.cli.pool_cmd import pool_description, shown_in_pool
from pvmit.cli.state import State, json_option, pass_state
from pvmit.errors import InputError
from pvmit.interface.forms import Form
from pvmit.kvm.system import Kvm
from pvmit.linux.model import predict
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.personality import resolve
from pvmit.vmm.runner import run_guest


@click.command("run")
@click.option("--guest-cpu", required=True, metavar="MODEL",
              help="CPU personality shown to the guest: a catalog model, a built-in personality "
                   "(icelake-server-v2, cascadelake-server-v2) or a template file (.toml).")
@click.option("--host-cpu", metavar="MODEL", help="A catalog model standing in for the host (default: this machine).")
@click.option("--form", type=click.Choice([f.value for f in Form]), default="intel", show_default=True,
              help="Which form of the interface the VMM offers.")
@click.option("--uses", default=None, metavar="LIST",
              help="Mitigations the guest reports: retpoline,bhb-short | none (default: what a Linux guest "
                   "shown this personality would use).")
@click.option("--pool", default="", metavar="MODELS",
              help="Comma-separated catalog models the VM may run on; MITIGATION_ENUM covers them all "
                   "(default: the host alone).")
@click.option("--spec-ctrl-write", default="0", metavar="VALUE", show_default=True,
              help="The IA32_SPEC_CTRL value the guest writes, trying to clear forced bits.")
@click.option("--describe-pool", is_flag=True,
              help="Offer the pool description (the CPU implementations of the host and --pool) to the guest.")
@operator_options
@json_option
@pass_state
def run(st: State, guest_cpu: str, host_cpu: str | None, form: str, uses: str | None, pool: str,
        spec_ctrl_write: str, force_on: str, force_off: str, unreported: str, bhi_policy: str, describe_pool: bool,
        json_out: bool) -> int:
    """Run pvmit's test guest on /dev/kvm: it discovers the interface, reports its mitigations, tries to clear
    forced IA32_SPEC_CTRL bits and triggers a #GP; prints its transcript and what was forced. Exit 0 only when
    every check passes."""
    catalog = st.catalog
    personality = resolve(catalog, guest_cpu)
    settings = settings_from_options(force_on, force_off, unreported, bhi_policy)
    try:
        spec_value = parse_register_value(spec_ctrl_write)
    except InputError as e:
        raise InputError(f"--spec-ctrl-write: {e}") from None
    relied = parse_uses(uses)
    predicted = relied is None
    if relied is None:
        relied = predict(personality.facts).relies_on
    kvm = Kvm()
    real, notes = this_machine(catalog)
    host = stand_in(catalog, host_cpu, real) if host_cpu else real
    hosts = [host] + [stand_in(catalog, m.strip(), real) for m in pool.split(",") if m.strip()]
    if len(hosts) > 1:  # the guest is shown only the speculation bits every host of its pool keeps true
        personality = shown_in_pool(personality, [(h.name, h.facts) for h in hosts])

    def live(line: str) -> None:
        if not json_out:
            out.print(esc(line))

    if not json_out:
        out.print(esc(f"vmm: guest personality {personality.name} ({personality.origin}); host {host.name}; "
                      f"form {form}"))
        out.print(esc(f"vmm: the guest uses {', '.join(sorted(m.value for m in relied)) or 'nothing'}"
                      + (" (what a Linux guest picks when shown this personality)" if predicted else "")))
        for n in notes:
            out.print(esc(f"vmm: host reading: {n}"))
    models = [host_cpu or ""] + [m.strip() for m in pool.split(",") if m.strip()]
    entries = pool_description(catalog, [(h.name, catalog.get(m).id if m else "", h.facts)
                                         for h, m in zip(hosts, models, strict=True)]) if describe_pool else False
    report = run_guest(kvm, personality, host, Form(form), relied, settings, spec_ctrl_write=spec_value,
                       pool=hosts, on_line=live, describe_pool=entries)
    kvm.close()
    if json_out:
        emit_json({**report.to_json(), "host_notes": notes})
        return 0 if report.passed else 1
    forced_list = report.decision["forced"]
    assert isinstance(forced_list, list)
    forced = ", ".join(f"{f['control']}={f['value']} ({f['why']})" for f in forced_list) or "nothing"
    out.print(esc(f"vmm: forced: {forced}; IA32_SPEC_CTRL guest {report.spec_ctrl['guest_value']}, in effect "
                  f"{report.spec_ctrl['effective']}; applied in hardware: "
                  f"{', '.join(report.spec_ctrl['in_hardware']) or 'none'}; modelled only: "  # type: ignore[arg-type]
                  f"{', '.join(report.spec_ctrl['modelled_only']) or 'none'}"))  # type: ignore[arg-type]
    x = report.exits
    out.print(esc(f"vmm: exits {x['total']}: {x['msr_read']} RDMSR, {x['msr_write']} WRMSR "
                  f"({x['spec_ctrl']} of IA32_SPEC_CTRL), {x['io']} I/O"))
    for check, ok, detail in report.checks:
        out.print(("[green]PASS[/] " if ok else "[red]FAIL[/] ") + esc(f"{check}: {detail}"))
    return 0 if report.passed else 1
