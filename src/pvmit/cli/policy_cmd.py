"""`pvmit policy`: what the forcing policy decides for a guest on a host, without running anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.table import Table

from pvmit.cli.output import emit_json, esc, out, yes_no
from pvmit.cli.state import State, json_option, pass_state
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.interface.policy import OperatorSettings, decide
from pvmit.x86.bits import SpecCtrl


def parse_uses(text: str | None) -> frozenset[Mitigation] | None:
    """'retpoline,bhb-short' -> mitigations; 'none' -> empty; None/'unreported' -> None (never reported)."""
    if text is None or text == "unreported":
        return None
    if text in ("", "none"):
        return frozenset()
    out_: set[Mitigation] = set()
    for word in text.split(","):
        try:
            out_.add(Mitigation(word.strip()))
        except ValueError:
            raise InputError(f"--uses: {word.strip()!r} is not one of "
                             f"{', '.join(m.value for m in Mitigation)}, none, unreported") from None
    return frozenset(out_)


def parse_bits(text: str, option: str) -> int:
    if not text:
        return 0
    try:
        return sum(int(SpecCtrl[w.strip().upper()]) for w in text.split(","))
    except KeyError as e:
        raise InputError(f"{option}: IA32_SPEC_CTRL has no bit named {e.args[0]!r}") from None


def settings_from_options(force_on: str, force_off: str, unreported: str) -> OperatorSettings:
    try:
        return OperatorSettings(parse_bits(force_on, "--force-on"), parse_bits(force_off, "--force-off"),
                                unreported)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(str(e)) from None


F = TypeVar("F", bound=Callable[..., Any])


def operator_options(f: F) -> F:
    """--force-on, --force-off, --unreported: the operator settings of `pvmit.interface.policy`."""
    f = click.option("--unreported", type=click.Choice(["trust", "assume-worst"]), default="assume-worst",
                     show_default=True, help="Policy for a guest that never reports.")(f)
    f = click.option("--force-off", default="", metavar="BITS",
                     help="IA32_SPEC_CTRL bits forced off, e.g. BHI_DIS_S.")(f)
    f = click.option("--force-on", default="", metavar="BITS",
                     help="IA32_SPEC_CTRL bits forced on, e.g. RRSBA_DIS_S.")(f)
    return f


@click.command("policy")
@click.option("--host-cpu", required=True, metavar="MODEL", help="The host the guest runs on (catalog model).")
@click.option("--guest-cpu", required=True, metavar="MODEL", help="The CPU personality the guest booted with.")
@click.option("--uses", default=None, metavar="LIST",
              help="What the guest reported: retpoline,bhb-short | none | unreported (default).")
@operator_options
@json_option
@pass_state
def policy(st: State, host_cpu: str, guest_cpu: str, uses: str | None, force_on: str, force_off: str,
           unreported: str, json_out: bool) -> int:
    """Show which IA32_SPEC_CTRL controls pvmit forces for a guest on a host, and why. Exit 1 if the guest would
    be left exposed."""
    host, guest = st.catalog.get(host_cpu), st.catalog.get(guest_cpu)
    d = decide(host.facts, parse_uses(uses), guest.facts, settings_from_options(force_on, force_off, unreported))
    if json_out:
        emit_json({"schema": "pvmit.policy/1", "host": host.id, "guest_cpu": guest.id, **d.to_json()})
        return 0 if d.safe else 1
    out.print(esc(f"guest booted as {guest.name}, running on {guest.name if host is guest else host.name}; "
                  f"relies on: {', '.join(sorted(m.value for m in d.relied)) or 'nothing'}"
                  f"{'' if d.reported else ' (not reported)'}"))
    t = Table(title="Forced IA32_SPEC_CTRL controls")
    for col in ("control", "value", "why", "exists on host", "reason"):
        t.add_column(col)
    for f in d.forced:
        t.add_row(f.control.name or "", str(int(f.on)), f.why.value, yes_no(f.in_hardware), esc(f.reason))
    out.print(t if d.forced else "nothing forced")
    for n in d.notes:
        out.print(esc(f"  note: {n}"))
    for w in d.warnings:
        out.print("[yellow]  warning:[/] " + esc(w))
    for e in d.exposures:
        out.print(("[yellow]  override:[/] " if e.override else "[red]  EXPOSED:[/] ") + esc(e.reason))
    out.print("safe" if d.safe else "[red]not safe: the guest is exposed on this host[/]")
    return 0 if d.safe else 1
