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
from pvmit.interface.bhi import DEFAULT_POLICY, POLICY_NAMES, parse_policy, shown_long_bit
from pvmit.interface.policy import OperatorSettings, decide, supported_requests
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


def settings_from_options(force_on: str, force_off: str, unreported: str,
                          bhi_policy: str = DEFAULT_POLICY.value) -> OperatorSettings:
    try:
        return OperatorSettings(parse_bits(force_on, "--force-on"), parse_bits(force_off, "--force-off"),
                                unreported, parse_policy(bhi_policy))  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(str(e)) from None


F = TypeVar("F", bound=Callable[..., Any])


def operator_options(f: F) -> F:
    """--force-on, --force-off, --unreported, --bhi-policy: the operator settings of `pvmit.interface.policy`."""
    f = click.option("--bhi-policy", type=click.Choice(POLICY_NAMES), default=DEFAULT_POLICY.value,
                     show_default=True, help="Who makes up for the short BHB-clearing loop (docs/bhi.md).")(f)
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
@click.option("--pool", default="", metavar="MODELS",
              help="Catalog models the VM may run on besides the host: MITIGATION_ENUM and LONG_BHB_NEEDED cover "
                   "them all (default: the host alone).")
@operator_options
@json_option
@pass_state
def policy(st: State, host_cpu: str, guest_cpu: str, uses: str | None, pool: str, force_on: str, force_off: str,
           unreported: str, bhi_policy: str, json_out: bool) -> int:
    """Show which IA32_SPEC_CTRL controls pvmit forces for a guest on a host, and why, under the BHI policy: what
    the guest is shown, what it must do, what the VMM forces and who is left exposed. Exit 1 if the guest would
    be left exposed (an exposure the BHI policy leaves to the guest by design is reported and exits 0)."""
    host, guest = st.catalog.get(host_cpu), st.catalog.get(guest_cpu)
    settings = settings_from_options(force_on, force_off, unreported, bhi_policy)
    hosts = [host.facts] + [st.catalog.get(m.strip()).facts for m in pool.split(",") if m.strip()]
    d = decide(host.facts, parse_uses(uses), guest.facts, settings)
    p = settings.bhi_policy
    shown = {"mitigation_enum": supported_requests(hosts, p), "long_bhb_needed": shown_long_bit(p, hosts)}
    if json_out:
        emit_json({"schema": "pvmit.policy/2", "host": host.id, "guest_cpu": guest.id,
                   "bhi_policy": {"name": p.value, "letter": p.letter, **p.definition.to_json()}, "shown": shown,
                   **d.to_json()})
        return 0 if d.safe else 1
    text = p.definition
    out.print(esc(f"BHI policy ({p.letter}) {p.value}: shown {text.shown}; the guest must {text.guest_must}; "
                  f"the VMM forces {text.vmm_forces}"))
    long_bit = shown["long_bhb_needed"]
    out.print(esc(f"this VM is shown MITIGATION_ENUM {shown['mitigation_enum']:#x}"
                  + ("" if long_bit is None else f", LONG_BHB_NEEDED = {int(long_bit)}")))
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
    for e in d.by_design:
        out.print("[yellow]  exposed by the policy's design:[/] " + esc(e.reason))
    out.print(("safe" + (" as far as the VMM goes: the BHI policy leaves the long loop to the guest" if d.by_design
                         else "")) if d.safe else "[red]not safe: the guest is exposed on this host[/]")
    return 0 if d.safe else 1
