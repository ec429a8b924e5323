"""`pvmit libvirt ...`: inventories from libvirt hosts, what guests rely on, the migration hook and its verdict.

Exit status: 0 done (check: the migration would be allowed); 1 a check failed (check: refused) or a host could not
be read; 2 bad input. Commands that talk to libvirt need the binding: `pip install 'pvmit[libvirt]'`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pvmit.cli.output import emit_json, err, esc, warn
from pvmit.cli.state import State, json_option, pass_state
from pvmit.errors import InputError, PvmitError
from pvmit.userfiles import write_atomic

UNKNOWN_CHOICE = click.Choice(["refuse", "allow"])


def _connect_option(f: Any) -> Any:
    return click.option("-c", "--connect", "uri", metavar="URI", default=None,
                        help="The libvirt connection (default: libvirt's own, LIBVIRT_DEFAULT_URI or "
                             "qemu:///system).")(f)


@click.group("libvirt")
def libvirt() -> None:
    """libvirt hosts and domains: inventory, what guests rely on, the migration hook (docs/libvirt.md)."""


@libvirt.command("inventory")
@click.argument("uris", nargs=-1, required=True, metavar="URI...")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the inventory here (default: stdout).")
@click.option("--agent/--no-agent", default=True, show_default=True,
              help="Read each guest's vulnerability lines through the QEMU guest agent.")
@click.option("--agent-timeout", type=click.IntRange(1, 300), default=5, show_default=True, metavar="S",
              help="Seconds to wait for each guest agent command.")
@pass_state
def inventory_cmd(st: State, uris: tuple[str, ...], output: Path | None, agent: bool, agent_timeout: int) -> int:
    """A fleet inventory from the libvirt connections URI... (`pvmit fleet plan` and `report` read it): each
    host's CPU from its capabilities, each running domain's CPU from its XML, and what each guest's kernel relies
    on, read through the QEMU guest agent (or recorded earlier with `pvmit libvirt record`); what cannot be read
    is left unknown, with the reason, in the document's `libvirt` section. Exit 1 if a host could not be read (the
    others are still written; nothing is written when no host could be read)."""
    from pvmit.libvirt.inventory import gather

    g = gather(list(uris), st.catalog, agent=agent, timeout=agent_timeout,
               say=lambda m: click.echo(f"pvmit: {m}", err=True))
    if not g.hosts:  # nothing read: an empty inventory must not replace a good one
        raise PvmitError("no host could be read: " + "; ".join(g.errors))
    doc = g.document()
    text = json.dumps(doc, indent=1) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        try:
            write_atomic(output, text)  # whole, or the old file stays
        except OSError as e:
            raise InputError(f"{e.filename or output}: cannot write the inventory: {e.strerror or e}") from None
        click.echo(f"pvmit: wrote {output}: {len(g.hosts)} hosts, {len(g.vms)} VMs", err=True)
    for w in g.warnings:
        warn(w)
    for problem in g.errors:
        click.echo(f"pvmit: error: {problem}", err=True)
    return 1 if g.errors else 0


def _relies(text: str | None) -> Any:
    if text is None:
        return None
    from pvmit.fleet.inventory import parse_relies_on

    try:
        return parse_relies_on(text)
    except ValueError as e:
        raise InputError(f"--relies-on: {e}") from None


def _settings(force_on: str | None, force_off: str | None, unreported: str | None) -> dict[str, str]:
    from pvmit.fleet.inventory import parse_bits

    out = {}
    for key, value in (("force_on", force_on), ("force_off", force_off)):
        if value is not None:
            try:
                parse_bits(value)
            except ValueError as e:
                raise InputError(f"--{key.replace('_', '-')}: {e}") from None
            out[key] = value
    if unreported is not None:
        out["unreported"] = unreported
    return out


@libvirt.command("record")
@click.argument("domains", nargs=-1, metavar="[DOMAIN]...")
@_connect_option
@click.option("--relies-on", metavar="LIST", help="Record this (retpoline, bhb-short, both or none) instead of "
                                                  "reading it through the guest agent.")
@click.option("--force-on", metavar="BITS", help="IA32_SPEC_CTRL controls to force on for this VM (its setting).")
@click.option("--force-off", metavar="BITS", help="Controls to force off for this VM.")
@click.option("--unreported", type=click.Choice(["trust", "assume-worst"]),
              help="How to judge this VM when nothing is known of what it relies on.")
@click.option("--agent-timeout", type=click.IntRange(1, 300), default=5, show_default=True, metavar="S")
@json_option
def record_cmd(domains: tuple[str, ...], uri: str | None, relies_on: str | None, force_on: str | None,
               force_off: str | None, unreported: str | None, agent_timeout: int, json_out: bool) -> int:
    """Write what each running DOMAIN's guest relies on (every running domain by default) into its metadata, where
    the migration hook finds it: read through the QEMU guest agent, or given with --relies-on; plus the VM's own
    settings. Run it again after a guest reboots. Exit 1 if a guest could not be read and had nothing recorded."""
    from pvmit.libvirt.inventory import record_guests

    results = record_guests(uri, list(domains), relies_on=_relies(relies_on),
                            settings=_settings(force_on, force_off, unreported), timeout=agent_timeout)
    if json_out:
        emit_json({"schema": "pvmit.libvirt-record/1", "domains": [r.to_json() for r in results]})
    else:
        for r in results:
            what = f"relies on {r.relies_on} ({r.source})" if r.written else "not written"
            err.print(f"pvmit: {esc(r.domain)}: {what}{': ' + esc(r.why) if r.why else ''}")
    return 0 if all(r.written for r in results) else 1


def _config(path: Path | None, host_cpu: str | None, on_unknown: str | None, mode: str | None,
            hypervisor_forces: bool | None, log: str | None) -> Any:
    from dataclasses import replace

    from pvmit.libvirt.config import HookConfig, load_config

    config = load_config(path) if path is not None else HookConfig()
    changes: dict[str, Any] = {k: v for k, v in (("host_cpu", host_cpu), ("on_unknown", on_unknown),
                                                 ("mode", mode), ("hypervisor_forces", hypervisor_forces),
                                                 ("log", log)) if v is not None}
    return replace(config, **changes)


@libvirt.command("check")
@click.argument("domain")
@_connect_option
@click.option("--to", "dest", required=True, metavar="URI", help="The destination host's libvirt connection.")
@click.option("--host-cpu", metavar="SPEC",
              help="The destination's CPU as its hook has it (host_cpu: a catalog model or facts file); default: "
                   "read from the destination's libvirt capabilities.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE",
              help="The destination hook's settings file (a copy of it), for the same verdict.")
@click.option("--on-unknown", type=UNKNOWN_CHOICE, help="Override the settings' on_unknown.")
@click.option("--hypervisor-forces/--no-hypervisor-forces", default=None,
              help="Override the settings' hypervisor_forces.")
@json_option
@pass_state
def check_cmd(st: State, domain: str, uri: str | None, dest: str, host_cpu: str | None, config_path: Path | None,
              on_unknown: str | None, hypervisor_forces: bool | None, json_out: bool) -> int:
    """Would the migration hook on the host at --to let DOMAIN (running where --connect points) migrate there?
    The same verdict, from the same XML and the same rules; exit 0 allowed, 1 refused."""
    from pvmit.libvirt.connection import Connection
    from pvmit.libvirt.facts import host_facts
    from pvmit.libvirt.parse import host_cpu as parse_host_cpu
    from pvmit.libvirt.verdict import judge

    config = _config(config_path, host_cpu, on_unknown, None, hypervisor_forces, None)
    with Connection(uri) as src:
        xml = src.xml(src.domain(domain), migratable=True)
    with Connection(dest) as dst:
        name = dst.hostname
        if host_cpu is not None or config.host_cpu != "inspect":
            cpu: Any = config.host_cpu
            how = f"host_cpu = {config.host_cpu!r}"
        else:
            hc = parse_host_cpu(dst.capabilities())
            features = dst.expand(hc.xml) | frozenset(hc.features) if hc.model else frozenset(hc.features)
            facts, _notes = host_facts(hc, features, dst.cpumap, st.catalog, f"libvirt capabilities of {name}")
            cpu, how = facts.to_json(), f"libvirt capabilities of {name} ({dest})"
        answer = judge(xml, name, cpu, how, dst.cpumap, st.catalog, config)
    if json_out:
        emit_json({"schema": "pvmit.libvirt-check/1", "domain": domain, "to": dest, **answer.to_json()})
    else:
        click.echo(answer.message(domain), err=True)
    return 0 if answer.allowed else 1


@libvirt.group("hook")
def hook() -> None:
    """The migration hook: libvirt runs it on the destination before every incoming migration."""


@hook.command("install")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="Install into this root (a mounted host image) instead of this system.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Where the hook reads its settings, as that system sees it [default: /etc/pvmit/libvirt-hook.toml].")
@click.option("--host-cpu", metavar="SPEC", help="host_cpu: 'inspect' (default), a catalog model, or a facts file.")
@click.option("--on-unknown", type=UNKNOWN_CHOICE, help="on_unknown (default refuse).")
@click.option("--mode", type=click.Choice(["enforce", "warn"]), help="mode (default enforce).")
@click.option("--hypervisor-forces/--no-hypervisor-forces", default=None,
              help="hypervisor_forces (default: no; stock QEMU/KVM forces nothing for guests).")
@click.option("--log", metavar="FILE", help="log (default /var/log/pvmit/libvirt-hook.log; '' for none).")
@click.option("--python", "python", metavar="PATH", help="The Python that runs pvmit (default: this one).")
@click.option("--force", is_flag=True, help="Overwrite an existing settings file.")
@json_option
def install_cmd(root: Path, config_path: Path | None, host_cpu: str | None, on_unknown: str | None,
                mode: str | None, hypervisor_forces: bool | None, log: str | None, python: str | None,
                force: bool, json_out: bool) -> None:
    """Install the hook script (ROOT/etc/libvirt/hooks/qemu.d/pvmit) and its settings file. libvirt looks for
    hooks when it starts: restart libvirtd (or virtqemud) afterwards."""
    from pvmit.libvirt.config import DEFAULT_PATH
    from pvmit.libvirt.install import install

    config = _config(None, host_cpu, on_unknown, mode, hypervisor_forces, log)
    if not root.is_dir():
        raise InputError(f"--root {root}: no such directory")
    done = install(root, config, config_path=config_path or DEFAULT_PATH, python=python, force=force)
    if json_out:
        emit_json({"schema": "pvmit.libvirt-hook-install/1", **done.to_json()})
        return
    click.echo(f"pvmit: installed {done.script}", err=True)
    if done.config_written:
        click.echo(f"pvmit: wrote {done.config}", err=True)
    else:
        click.echo(f"pvmit: kept the existing {done.config} (--force replaces it)", err=True)
    if root == Path("/"):
        click.echo("pvmit: restart libvirtd (or virtqemud) so that libvirt runs the new hook", err=True)
