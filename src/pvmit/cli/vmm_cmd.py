"""`pvmit vmm` (a VMM process with a control socket), `pvmit migrate` and `pvmit ctl` (talk to one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pvmit.cli import params
from pvmit.cli.output import emit_json, err, esc, out
from pvmit.cli.policy_cmd import operator_options, parse_uses, settings_from_options
from pvmit.cli.pool_cmd import pool_description, shown_in_pool
from pvmit.cli.state import State, json_option, pass_state
from pvmit.errors import InputError, PvmitError
from pvmit.interface.bhi import shown_long_bit
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import PartialSettings, supported_requests
from pvmit.kvm.system import Kvm
from pvmit.linux.model import predict
from pvmit.migration.destination import DEST_FAULTS
from pvmit.migration.source import FAULTS, allow_fault
from pvmit.net.address import Address
from pvmit.net.text import shorten
from pvmit.net.tls import Credentials
from pvmit.node.control import request as control_request
from pvmit.node.process import DEFAULT_HEARTBEAT, FILLS, MAX_HEARTBEAT, Boot, Limits, VmmProcess
from pvmit.safetext import quoted, safe_text
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.machine import MAX_MEMORY
from pvmit.vmm.personality import resolve


def parse_size(text: str) -> int:
    """Guest memory: a multiple of 2 MiB from 4 MiB to MAX_MEMORY."""
    value = params.parse_size(text, "guest memory")
    if value < 4 << 20 or value > MAX_MEMORY or value % (2 << 20):
        raise InputError(f"guest memory {quoted(text)} must be a multiple of 2 MiB from 4 MiB to "
                         f"{MAX_MEMORY >> 30} GiB")
    return value


tls_option = click.option(
    "--tls-creds", "tls_creds", metavar="DIR", type=click.Path(path_type=Path),
    help="Mutual TLS credentials for TCP endpoints, laid out as QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, "
         "server-key.pem, client-cert.pem, client-key.pem). `pvmit tls make-test-ca` makes a test set.")


def load_creds(path: Path | None, roles: tuple[str, ...], *addresses: Address | None) -> Credentials | None:
    """The credentials, checked now; plain TCP (without them) refused with the way to give them."""
    creds = Credentials.load(path, roles=roles) if path is not None else None
    for a in addresses:
        if a is not None and a.is_tcp and creds is None:
            from pvmit.net.tls import HOW
            where = "" if a.is_loopback else ", not a loopback address,"
            raise InputError(f"{a}{where} is TCP: pvmit speaks TCP only over mutual TLS (any local user can connect "
                             f"to a loopback port); {HOW}")
    return creds


@click.command("vmm")
@click.option("--control", required=True, metavar="ADDR", help="Control socket: unix:/path or tcp:HOST:PORT (TLS).")
@click.option("--host-cpu", metavar="MODEL", help="A catalog model standing in for this host (default: this machine).")
@click.option("--incoming", metavar="ADDR",
              help="Accept guests migrating in at ADDR (unix:/path or tcp:HOST:PORT with --tls-creds); without "
                   "--guest-cpu, wait for one instead of booting.")
@click.option("--guest-cpu", metavar="MODEL", help="Personality of the guest to boot.")
@click.option("--form", type=click.Choice([f.value for f in Form]), default="intel", show_default=True)
@click.option("--uses", default=None, metavar="LIST",
              help="What the guest reports: retpoline,bhb-short | none | unreported (default: what a Linux "
                   "guest shown the personality would use).")
@click.option("--pool", default="", metavar="MODELS", help="Catalog models this VM may run on (MITIGATION_ENUM).")
@click.option("--describe-pool", is_flag=True,
              help="Offer the pool description (the CPU implementations of this host and --pool) to the guest.")
@click.option("--memory", type=params.Converted(parse_size, "size"), default="64M", show_default=True,
              help="Guest memory: a multiple of 2 MiB from 4 MiB to 1 GiB.")
@click.option("--heartbeat", default=DEFAULT_HEARTBEAT, show_default=True,
              type=params.BoundedInt(1, MAX_HEARTBEAT), help="Guest iterations per heartbeat line.")
@click.option("--fill-memory", type=click.Choice(FILLS), default="none", is_flag=False, flag_value="pattern",
              help="Fill the guest's free memory with data (for benchmarks): a pattern, or random bytes.")
@click.option("--deadline", default=300.0, show_default=True, type=params.BoundedFloat(1, 86400),
              help="Seconds a migration, in or out, may take in all before it is given up.")
@click.option("--stall", default=30.0, show_default=True, type=params.BoundedFloat(0.5, 3600),
              help="Seconds a migration peer may send or take nothing before it is given up.")
@click.option("--settle-notice", default=60.0, show_default=True, type=params.BoundedFloat(0.5, 86400), hidden=True)
@click.option("--fault", type=click.Choice(DEST_FAULTS), hidden=True)
@tls_option
@operator_options
@pass_state
def vmm(st: State, control: str, host_cpu: str | None, incoming: str | None, guest_cpu: str | None, form: str,
        uses: str | None, pool: str, describe_pool: bool, memory: int, heartbeat: int, fill_memory: str,
        deadline: float, stall: float, settle_notice: float, fault: str | None, tls_creds: Path | None,
        force_on: str, force_off: str, unreported: str, bhi_policy: str) -> int:
    """Run a VMM process: boot the counting guest (--guest-cpu) and/or receive guests (--incoming), and serve
    commands on the control socket until told to quit. A guest received keeps the operator settings it had on its
    source; --force-on, --force-off or --unreported given here replace those fields only."""
    catalog = st.catalog
    settings = settings_from_options(force_on, force_off, unreported, bhi_policy)
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
    if incoming_addr is None and guest_cpu is None:
        raise InputError("give --guest-cpu (boot a guest here), --incoming ADDR (receive one), or both")
    if incoming_addr is not None and str(incoming_addr) == str(control_addr):
        raise InputError("--control and --incoming must be different addresses")
    creds = load_creds(tls_creds, ("server", "client"), control_addr, incoming_addr)
    # Everything the user gave is checked before anything is created: an error leaves no socket behind.
    boot: Boot | None = None
    real, notes = this_machine(catalog)
    host = stand_in(catalog, host_cpu, real) if host_cpu else real
    if guest_cpu is not None:
        personality = resolve(catalog, guest_cpu)
        relied = parse_uses(uses) if uses is not None else predict(personality.facts).relies_on
        hosts = [host.facts] + [catalog.get(m.strip()).facts for m in pool.split(",") if m.strip()]
        if len(hosts) > 1:  # shown only the speculation bits every host of its pool keeps true (pool rule)
            personality = shown_in_pool(personality, [(str(i), h) for i, h in enumerate(hosts)])
        policy = settings.bhi_policy
        config = InterfaceConfig(Form(form), supported_requests(hosts, policy),
                                 bhb_long=shown_long_bit(policy, hosts),
                                 pool=pool_description(catalog, [("", host_cpu or "", host.facts)] + [
                                     ("", m.strip(), catalog.get(m.strip()).facts)
                                     for m in pool.split(",") if m.strip()]) if describe_pool else None)
        boot = Boot(personality, config, settings, relied, memory, heartbeat, fill_memory)

    def say(line: str) -> None:
        print(safe_text(line), flush=True)  # guest output and peers' names included: escaped for the terminal

    for n in notes:
        say(f"vmm: host reading: {n}")
    with Kvm() as kvm:
        proc = VmmProcess(kvm, host, control_addr, say, creds=creds, incoming=incoming_addr,
                          settings=here if incoming_addr and given else None, fault=fault,
                          limits=Limits(deadline, stall, settle_notice))
        try:
            if boot is not None:
                proc.boot(boot)
        except BaseException:
            proc.close()
            raise
        proc.serve()
    return 0


def _answer_error(answer: dict[str, Any]) -> str:
    return shorten(str(answer.get("error")), 2000)


@click.command("migrate")
@click.option("--from", "source", required=True, metavar="ADDR", help="The source VMM's control socket.")
@click.option("--to", "dest", required=True, metavar="ADDR", help="The destination VMM's incoming address.")
@click.option("--check", is_flag=True, help="Only ask the destination for its verdict; move nothing.")
@click.option("--fault", type=click.Choice(FAULTS), hidden=True, help="Test only: make the source misbehave.")
@tls_option
@json_option
def migrate(source: str, dest: str, check: bool, fault: str | None, tls_creds: Path | None, json_out: bool) -> int:
    """Move the running guest of the VMM at --from to the VMM waiting at --to. The destination decides before the
    source pauses; a refusal or any failure leaves the guest running on the source. Exit 0 when the guest moved
    (or, with --check, would be accepted), 1 when refused or failed (or in doubt: the message says what to run)."""
    src = Address.parse(source)
    Address.parse(dest)
    creds = load_creds(tls_creds, ("client",), src)

    def event(doc: dict[str, object]) -> None:
        if not json_out:
            err.print(esc(f"migrate: {shorten(str(doc.get('event')), 2000)}"))

    answer = control_request(src, {"cmd": "migrate", "to": dest, "check": check, "fault": fault}, event,
                             creds=creds)
    if not answer.get("ok"):
        raise PvmitError(f"the source VMM says: {_answer_error(answer)}")
    result = answer.get("result")
    if not isinstance(result, dict):
        raise PvmitError("the source VMM's answer has no result")
    if json_out:
        emit_json({"schema": "pvmit.migrate/2", **result})
    else:
        verdict = result.get("verdict") or {}
        if result.get("migrated"):
            ready = result.get("ready") or {}
            out.print(esc(f"migrated ({result.get('mode')}, {result.get('rounds')} pre-copy rounds, "
                          f"{result.get('pages_sent')} pages of which {result.get('zero_pages')} zero, "
                          f"{result.get('total_seconds')} s): the destination forces "
                          f"{', '.join(str(f) for f in ready.get('forced', [])) or 'nothing'}"))
        elif check and result.get("accepted"):
            out.print("check: the destination would accept the guest")
        else:
            out.print(esc(f"not moved: {shorten(str(result.get('reason')), 2000)}; {result.get('guest')}"))
        for r in verdict.get("reasons", []) if isinstance(verdict, dict) else []:
            out.print(esc(f"  reason: {shorten(str(r), 2000)}"))
    ok = result.get("migrated") or (check and result.get("accepted"))
    return 0 if ok else 1


@click.command("ctl")
@click.argument("address")
@click.argument("command", type=click.Choice(["status", "quit", "resolve", "outcome"]))
@click.argument("argument", required=False)
@click.option("--force", is_flag=True, help="quit: even while a migration is in flight.")
@click.option("--timeout", default=30.0, show_default=True, type=params.BoundedFloat(0.1, 3600),
              help="Seconds to wait for the answer.")
@tls_option
def ctl(address: str, command: str, argument: str | None, force: bool, timeout: float,
        tls_creds: Path | None) -> int:
    """Send COMMAND to the VMM whose control socket is ADDRESS; prints its JSON answer.

    \b
    status                 what the VMM runs and does
    quit [--force]         end the VMM (refused while a migration is in flight, unless forced)
    resolve run|discard    settle a migration in doubt: run the guest here, or discard this copy
    outcome MIGRATION      what this VMM knows of a migration (what VMMs ask each other)
    """
    addr = Address.parse(address)
    creds = load_creds(tls_creds, ("client",), addr)
    doc: dict[str, Any] = {"cmd": command}
    if command == "quit" and force:
        doc["force"] = True
    if command in ("resolve", "outcome"):
        if not argument:
            wanted = "run or discard" if command == "resolve" else "a migration id"
            raise InputError(f"ctl {command} needs an argument ({wanted})")
        if command == "resolve" and argument not in ("run", "discard"):
            raise InputError("ctl resolve takes run or discard")
        doc["action" if command == "resolve" else "migration"] = argument
    elif argument is not None:
        raise InputError(f"ctl {command} takes no argument")
    answer = control_request(addr, doc, creds=creds, timeout=timeout)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0 if answer.get("ok") else 1
