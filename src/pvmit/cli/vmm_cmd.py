"""`pvmit vmm` (a VMM process with a control socket), `pvmit migrate` and `pvmit ctl` (talk to one)."""

from __future__ import annotations

import json
import sys

import click

from pvmit.cli.output import emit_json, err, esc, out
from pvmit.cli.policy_cmd import operator_options, parse_uses, settings_from_options
from pvmit.cli.pool_cmd import shown_in_pool
from pvmit.cli.state import State, json_option, pass_state
from pvmit.errors import InputError, PvmitError
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import PartialSettings, supported_requests
from pvmit.kvm.system import Kvm
from pvmit.linux.model import predict
from pvmit.migration.source import FAULTS, allow_fault
from pvmit.migration.transport import Address
from pvmit.node.process import DEFAULT_HEARTBEAT, Boot, VmmProcess, control_request
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.machine import MAX_MEMORY
from pvmit.vmm.personality import resolve


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise InputError(f"{text!r} is not a size (for example 64M or 512M)") from None
    if value < 4 << 20 or value > MAX_MEMORY or value % (2 << 20):
        raise InputError(f"guest memory {text!r} must be a multiple of 2 MiB from 4 MiB to {MAX_MEMORY >> 30} GiB")
    return value


@click.command("vmm")
@click.option("--control", required=True, metavar="ADDR", help="Control socket: unix:/path or tcp:127.0.0.1:PORT.")
@click.option("--host-cpu", metavar="MODEL", help="A catalog model standing in for this host (default: this machine).")
@click.option("--incoming", metavar="ADDR", help="Wait for a guest migrating in at ADDR instead of booting one.")
@click.option("--guest-cpu", metavar="MODEL", help="Personality of the guest to boot.")
@click.option("--form", type=click.Choice([f.value for f in Form]), default="intel", show_default=True)
@click.option("--uses", default=None, metavar="LIST",
              help="What the guest reports: retpoline,bhb-short | none | unreported (default: what a Linux "
                   "guest shown the personality would use).")
@click.option("--pool", default="", metavar="MODELS", help="Catalog models this VM may run on (MITIGATION_ENUM).")
@click.option("--memory", default="64M", show_default=True, help="Guest memory.")
@click.option("--heartbeat", default=DEFAULT_HEARTBEAT, show_default=True, help="Guest iterations per heartbeat.")
@click.option("--fill-memory", is_flag=True, help="Fill the guest's free memory with data (for benchmarks).")
@click.option("--fault", type=click.Choice(["die-after-pages", "die-after-state"]), hidden=True)
@operator_options
@pass_state
def vmm(st: State, control: str, host_cpu: str | None, incoming: str | None, guest_cpu: str | None, form: str,
        uses: str | None, pool: str, memory: str, heartbeat: int, fill_memory: bool, fault: str | None,
        force_on: str, force_off: str, unreported: str) -> int:
    """Run a VMM process: boot the counting guest (--guest-cpu) or receive one (--incoming), and serve commands
    on the control socket until told to quit. A guest received keeps the operator settings it had on its source;
    --force-on, --force-off or --unreported given here replace those fields only."""
    catalog = st.catalog
    settings = settings_from_options(force_on, force_off, unreported)
    ctx = click.get_current_context()
    given = {o for o in ("force_on", "force_off", "unreported")
             if ctx.get_parameter_source(o) is not click.core.ParameterSource.DEFAULT}
    # An incoming VM keeps the operator settings it carries; the options given here go over them, field by field.
    here = PartialSettings(settings.force_on if "force_on" in given else None,
                           settings.force_off if "force_off" in given else None,
                           settings.unreported if "unreported" in given else None)
    allow_fault(fault)
    control_addr = Address.parse(control)
    incoming_addr = Address.parse(incoming) if incoming else None
    if (incoming_addr is None) == (guest_cpu is None):
        raise InputError("give either --guest-cpu (boot a guest here) or --incoming ADDR (receive one)")
    real, notes = this_machine(catalog)
    host = stand_in(catalog, host_cpu, real) if host_cpu else real

    def say(line: str) -> None:
        print(line, flush=True)

    for n in notes:
        say(f"vmm: host reading: {n}")
    with Kvm() as kvm:
        proc = VmmProcess(kvm, host, control_addr, say, here if incoming_addr and given else None, fault)
        say(f"vmm: control socket {control_addr}, pid {__import__('os').getpid()}")
        if incoming_addr is not None:
            proc.wait_incoming(incoming_addr)
        else:
            assert guest_cpu is not None
            personality = resolve(catalog, guest_cpu)
            relied = parse_uses(uses) if uses is not None else predict(personality.facts).relies_on
            hosts = [host.facts] + [catalog.get(m.strip()).facts for m in pool.split(",") if m.strip()]
            if len(hosts) > 1:  # shown only the speculation bits every host of its pool keeps true
                personality = shown_in_pool(personality, [(str(i), h) for i, h in enumerate(hosts)])
            config = InterfaceConfig(Form(form), supported_requests(hosts))
            proc.boot(Boot(personality, config, settings, relied, parse_size(memory), heartbeat, fill_memory))
        proc.serve()
    return 0


@click.command("migrate")
@click.option("--from", "source", required=True, metavar="ADDR", help="The source VMM's control socket.")
@click.option("--to", "dest", required=True, metavar="ADDR", help="The destination VMM's incoming address.")
@click.option("--check", is_flag=True, help="Only ask the destination for its verdict; move nothing.")
@click.option("--fault", type=click.Choice(FAULTS), hidden=True, help="Test only: make the source misbehave.")
@json_option
def migrate(source: str, dest: str, check: bool, fault: str | None, json_out: bool) -> int:
    """Move the running guest of the VMM at --from to the VMM waiting at --to. The destination decides before the
    source pauses; a refusal or any failure leaves the guest running on the source. Exit 0 when the guest moved
    (or, with --check, would be accepted), 1 when refused or failed."""
    Address.parse(source)
    Address.parse(dest)

    def event(doc: dict[str, object]) -> None:
        if not json_out:
            err.print(esc(f"migrate: {doc['event']}"))

    answer = control_request(source, {"cmd": "migrate", "to": dest, "check": check, "fault": fault}, event)
    if not answer.get("ok"):
        raise PvmitError(f"the source VMM says: {answer.get('error')}")
    result = answer["result"]
    assert isinstance(result, dict)
    if json_out:
        emit_json({"schema": "pvmit.migrate/1", **result})
    else:
        verdict = result.get("verdict") or {}
        if result["migrated"]:
            ready = result.get("ready") or {}
            out.print(esc(f"migrated ({result['mode']}, {result['rounds']} pre-copy rounds, {result['pages_sent']} "
                          f"pages, {result['total_seconds']} s): the destination forces "
                          f"{', '.join(ready.get('forced', [])) or 'nothing'}"))
        elif check and result["accepted"]:
            out.print("check: the destination would accept the guest")
        else:
            out.print(esc(f"not moved: {result['reason']}; {result['guest']}"))
        for r in verdict.get("reasons", []) if isinstance(verdict, dict) else []:
            out.print(esc(f"  reason: {r}"))
    ok = result["migrated"] or (check and result["accepted"])
    return 0 if ok else 1


@click.command("ctl")
@click.argument("address")
@click.argument("command", type=click.Choice(["status", "quit"]))
def ctl(address: str, command: str) -> int:
    """Send COMMAND (status or quit) to the VMM whose control socket is ADDRESS; prints its JSON answer."""
    answer = control_request(address, {"cmd": command}, lambda doc: None, timeout=30)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0 if answer.get("ok") else 1
