"""`pvmit fleet ...`: plan migrations across a fleet, write an HTML report, generate fleets, get the sample.

Exit status of plan and report: 0 when every inventory row was valid and the output was written; 2 when some rows
were wrong (they are reported on stderr and left out; the plan of the valid rows is still written), or at the
first wrong row with --strict (nothing else is written).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from pvmit.cli.output import emit_json, err, esc, out, warn
from pvmit.cli.params import BoundedInt
from pvmit.cli.state import State, json_option, pass_state
from pvmit.errors import InputError, PvmitError
from pvmit.interface.bhi import DEFAULT_POLICY, POLICY_NAMES, parse_policy
from pvmit.safetext import clean_message, safe_text
from pvmit.userfiles import write_atomic

if TYPE_CHECKING:  # numpy and pyarrow load only when a fleet command runs, not with every pvmit command
    from pvmit.fleet.plan import Plan

MAX_VMS, MAX_HOSTS, MAX_SEED = 10_000_000, 1_000_000, 2 ** 32 - 1
"""Bounds of a generated fleet (about 250 MiB of memory per million VMs) and of its seed."""
PROGRESS_FROM = 100_000
"""Rows from which stage progress is shown on stderr without --progress."""
SHOWN = 25


class Stages:
    """Stage lines with timings on stderr, for long runs (or when asked)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled  # None: decided by the fleet's size (`size`)
        self.t0 = self.t = time.perf_counter()
        self.timings: dict[str, float] = {}

    def size(self, rows: int) -> None:
        if self.enabled is None:
            self.enabled = rows >= PROGRESS_FROM

    def say(self, message: str) -> None:
        if self.enabled:
            click.echo(f"fleet: {safe_text(message)}", err=True)

    def done(self, stage: str, message: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self.t
        self.t = now
        self.say(f"{message} ({self.timings[stage]:.2f} s)")


def is_uri(text: str) -> bool:
    """A libvirt connection URI (qemu:///system, qemu+ssh://host/system, ...) rather than a file."""
    return re.match(r"^[a-z][a-z0-9+.-]*:/", text) is not None and not Path(text).exists()


def load_plan(st: State, inventory: tuple[str, ...], strict: bool, stages: Stages,
              bhi_policy: str = DEFAULT_POLICY.value) -> Plan:
    """Read, check, collapse and plan under the BHI policy; with --strict the first wrong row stops everything
    (exit 2)."""
    from pvmit.fleet.classes import Resolver, collapse
    from pvmit.fleet.inventory import read_document, read_inventory
    from pvmit.fleet.plan import Judge, plan

    if not inventory:
        raise InputError("give an inventory: a JSON file, a directory with hosts.* and vms.*, or both table files, "
                         "or libvirt connection URIs")
    catalog = st.catalog
    uris = [i for i in inventory if is_uri(i)]
    if uris and len(uris) != len(inventory):
        raise InputError("give either libvirt connection URIs or inventory files, not both")
    if uris:
        from pvmit.libvirt.inventory import gather

        g = gather(uris, catalog, say=stages.say)
        for w in g.warnings:
            warn(w)
        if g.errors:
            raise PvmitError("; ".join(g.errors))
        raw = read_document(g.document(), "libvirt inventory of " + ", ".join(uris), Path("."))
    else:
        raw = read_inventory([Path(i) for i in inventory])
    n = raw.vms.num_rows
    stages.size(n)
    stages.done("read", f"read {raw.hosts.num_rows:,} host rows and {n:,} VM rows")
    policy = parse_policy(bhi_policy)
    fleet = collapse(raw, Resolver(catalog), policy)  # checks every value; its errors join the reader's in raw.errors
    if strict and fleet.errors:
        raise InputError(str(fleet.errors.first(1)[0]))  # the first wrong row of all, by table and row
    stages.done("classes", f"{fleet.num_hosts:,} hosts in {len(fleet.host_classes):,} classes, {fleet.num_vms:,} VMs "
                           f"in {len(fleet.vm_classes):,} classes")
    p = plan(fleet, Judge(bhi_policy=policy), progress=stages.say)
    stages.done("plan", f"planned: {p.pairs:,} class pairs, {p.decisions:,} policy decisions, {len(p.pools)} pools")
    return p


def _report_errors(p: Plan) -> None:
    for w in p.fleet.warnings:
        warn(w)
    errors = p.fleet.errors
    if not errors:
        return
    for e in errors.first(SHOWN):
        click.echo(f"pvmit: error: {clean_message(str(e))}", err=True)  # one line each, never wrapped
    if errors.total > SHOWN:
        click.echo(f"pvmit: error: ... and {errors.total - SHOWN:,} more (`--json` lists the first 1,000)", err=True)
    click.echo(f"pvmit: {errors.total:,} inventory rows had errors and were left out; the plan covers the valid "
               "rows", err=True)


def _exit_code(p: Plan) -> int:
    return 2 if p.fleet.errors else 0


def bhi_policy_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--bhi-policy", type=click.Choice(POLICY_NAMES), default=DEFAULT_POLICY.value,
                        show_default=True,
                        help="Plan as if the VMMs ran this BHI policy (docs/bhi.md): MITIGATION_ENUM, "
                             "LONG_BHB_NEEDED and what is forced follow it.")(f)


def _progress_flag(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--progress/--quiet", "progress", default=None,
                     help=f"Stage progress on stderr (default: on from {PROGRESS_FROM:,} VMs).")(f)
    f = click.option("--strict", is_flag=True, help="Stop at the first wrong inventory row (exit 2).")(f)
    return f


@click.group("fleet")
def fleet() -> None:
    """Fleet planning: which VMs may move to which hosts, and what each move would force."""


@fleet.command("plan")
@click.argument("inventory", nargs=-1)
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="DIR",
              help="Also write the plan's tables (vms, pairs, hosts, host_classes, vm_classes, pools) here.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True,
              help="Format of the tables written with --output.")
@click.option("--per-vm", is_flag=True,
              help="Also list every VM's destination hosts (a 'moves' table, destination_hosts in --json): "
                   "VMs x hosts rows, for small fleets.")
@click.option("--vm", "vms", multiple=True, metavar="NAME", help="Show this VM's destinations in detail.")
@bhi_policy_option
@_progress_flag
@json_option
@pass_state
def plan_cmd(st: State, inventory: tuple[str, ...], output: Path | None, fmt: str, per_vm: bool,
             vms: tuple[str, ...], bhi_policy: str, strict: bool, progress: bool | None, json_out: bool) -> int:
    """Plan migrations for INVENTORY (a JSON file, a directory with hosts.* and vms.*, or HOSTS VMS files; or
    libvirt connection URIs, read as `pvmit libvirt inventory` reads them): per VM the destinations that are safe
    as they are, safe only with forced controls (which, and why), or would leave it exposed (why); the migration
    pools; the VMs with no safe destination outside their host. Exit 2 when some rows were wrong: they are named
    on stderr and left out, and the rest is planned."""
    from pvmit.fleet.document import vm_detail

    format_given = click.get_current_context().get_parameter_source("fmt") is not click.core.ParameterSource.DEFAULT
    if format_given and output is None:
        raise InputError("--format chooses the format of the tables --output writes; give --output DIR")
    stages = Stages(progress)
    p = load_plan(st, inventory, strict, stages, bhi_policy)
    details = [vm_detail(p, name) for name in vms]  # unknown names are bad input, whatever the output
    _report_errors(p)
    if output is not None:
        from pvmit.fleet.tables import write_tables

        try:
            paths = write_tables(p, output, fmt, per_vm)
        except OSError as e:
            raise InputError(f"{e.filename or output}: cannot write the plan's tables: {e.strerror or e}") from None
        stages.done("write", f"wrote {len(paths)} tables to {output}")
        if not json_out:
            click.echo(f"pvmit: wrote {safe_text(', '.join(str(x) for x in paths))}", err=True)
    if json_out:
        from pvmit.fleet.document import plan_document

        doc = plan_document(p, per_vm)
        if details:
            doc["vm_details"] = details
        emit_json(doc)
        stages.done("json", "wrote the JSON document")
        return _exit_code(p)
    _print_summary(p)
    for d in details:
        _print_vm(d)
    if per_vm and output is None:
        err.print("pvmit: --per-vm lists destinations in --json and in the tables --output writes; "
                  "--vm NAME shows one VM here")
    return _exit_code(p)


def _print_summary(p: Plan) -> None:
    f = p.fleet
    c = p.counts()
    here = c["vms_by_verdict_on_own_host"]
    assert isinstance(here, dict)
    out.print(esc(f"Fleet: {c['hosts']:,} hosts in {c['host_classes']:,} classes, {c['vms']:,} VMs in "
                  f"{c['vm_classes']:,} classes ({c['unenlightened_vms']:,} unenlightened); {c['class_pairs']:,} "
                  f"class pairs judged with {c['decisions']:,} policy decisions"))
    out.print(f"Where VMs run now: [green]{here['safe']:,} safe[/], [yellow]{here['forced']:,} forced[/], "
              f"[red]{here['exposed']:,} exposed[/]")
    t = Table(title="Host classes")
    for col in ("class", "CPU", "settings", "hosts"):
        t.add_column(col, justify="right" if col == "hosts" else "left")
    for j, hc in enumerate(f.host_classes[:SHOWN * 2]):
        t.add_row(f"H{j}", esc(hc.cpu), esc(hc.settings.label()), f"{int(p.host_class_size[j]):,}")
    out.print(t)
    if len(f.host_classes) > SHOWN * 2:
        out.print(f"  ... {len(f.host_classes) - SHOWN * 2:,} more host classes (--json or --output lists them)")
    t = Table(title="VM classes, largest first: hosts by verdict for a VM of the class (its own host included)")
    for col in ("class", "personality", "reported", "form", "enum", "VMs", "safe", "forced", "exposed", "pool"):
        t.add_column(col, justify="right" if col in ("VMs", "safe", "forced", "exposed") else "left")
    order = sorted(range(len(f.vm_classes)), key=lambda i: (-int(p.vm_class_size[i]), i))
    for i in order[:SHOWN]:
        vc = f.vm_classes[i]
        pool = int(p.vm_class_pool[i])
        cc = p.class_counts[i]
        t.add_row(f"C{i}", esc(vc.personality), esc(vc.mitigations), vc.form.value if vc.form else "none",
                  esc(str(vc.to_json()["supported"])), f"{int(p.vm_class_size[i]):,}", f"[green]{int(cc[0]):,}[/]",
                  f"[yellow]{int(cc[1]):,}[/]", f"[red]{int(cc[2]):,}[/]", p.pools[pool].id if pool >= 0 else "-")
    out.print(t)
    if len(order) > SHOWN:
        out.print(f"  ... {len(order) - SHOWN:,} more VM classes (--json or --output lists them)")
    t = Table(title="Migration pools: hosts among which every VM of the pool's classes may move freely")
    for col in ("pool", "hosts", "CPUs", "VM classes", "VMs", "hosts forcing controls"):
        t.add_column(col)
    for pl in p.pools[:SHOWN]:
        cpus = ", ".join(sorted({f.host_classes[h].cpu for h in pl.host_classes}))
        t.add_row(pl.id, f"{pl.hosts:,}", esc(cpus), f"{len(pl.vm_classes):,}", f"{pl.vms:,}",
                  f"{pl.forcing_hosts:,}")
    out.print(t)
    stranded = p.stranded
    if not f.num_vms:
        out.print("No VMs to plan.")
    elif stranded.size:
        names = f.vm_names.take(stranded[:SHOWN]).to_pylist()
        more = f" and {stranded.size - SHOWN:,} more" if stranded.size > SHOWN else ""
        out.print(f"[red]{stranded.size:,} VMs have no safe destination outside their host:[/] "
                  + esc(", ".join(names)) + more)
    else:
        out.print("[green]Every VM has at least one safe destination outside its host.[/]")


def _print_vm(d: dict[str, Any]) -> None:
    out.print("\n" + esc(f"VM {d['name']} on {d['host']} (class C{d['class']}: {d['class_label']}); "
                         f"where it runs: {d['verdict_here']}"))
    for word, n in d["destinations_by_verdict"].items():
        out.print(f"  {word} destinations: {n:,}")
    t = Table(title=f"Destinations of {esc(d['name'])} by host class (its own host left out)")
    for col in ("host class", "verdict", "hosts", "forced", "why"):
        t.add_column(col)
    colour = {"safe": "green", "forced": "yellow", "exposed": "red"}
    for m in d["destinations"]:
        hosts = m["hosts"]
        shown = ", ".join(hosts[:4]) + (f" +{len(hosts) - 4:,}" if len(hosts) > 4 else "")
        t.add_row(esc(f"H{m['host_class']} {m['label']}"), f"[{colour[m['verdict']]}]{m['verdict']}[/]", esc(shown),
                  esc(", ".join(m["forced"]) or "-"), "\n".join(map(esc, m["reasons"] + m["warnings"])))
    out.print(t)


@fleet.command("report")
@click.argument("inventory", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="FILE.html",
              help="Where to write the report.")
@click.option("--max-vm-rows", type=BoundedInt(0, MAX_VMS), default=100_000, show_default=True,
              help="VMs listed in the report's table (those that cannot move and those exposed first).")
@bhi_policy_option
@_progress_flag
@pass_state
def report_cmd(st: State, inventory: tuple[str, ...], output: Path, max_vm_rows: int, bhi_policy: str,
               strict: bool,
               progress: bool | None) -> int:
    """Write one self-contained HTML report of the plan (opens offline): summary, a heat map of host classes
    against VM classes, pool sizes, searchable tables. INVENTORY as for `plan` (files, or libvirt URIs)."""
    from pvmit.fleet.report import render_report

    stages = Stages(progress)
    p = load_plan(st, inventory, strict, stages, bhi_policy)
    _report_errors(p)
    try:
        write_atomic(output, render_report(p, max_vm_rows=max_vm_rows))
    except OSError as e:
        raise InputError(f"{output}: cannot write the report: {e.strerror or e}") from None
    stages.done("report", "wrote the report")
    err.print(esc(f"pvmit: wrote {output}"))
    return _exit_code(p)


@fleet.command("generate")
@click.option("--vms", "n_vms", type=BoundedInt(0, MAX_VMS), required=True, help="Number of VMs.")
@click.option("--hosts", "n_hosts", type=BoundedInt(1, MAX_HOSTS), required=True, help="Number of hosts.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="PATH",
              help="A .json file (one inventory), or a directory for hosts.<fmt> and vms.<fmt>.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "json"]), default="parquet",
              show_default=True, help="Table format when PATH is a directory.")
@click.option("--seed", type=BoundedInt(0, MAX_SEED), default=1, show_default=True,
              help="Random seed (the same seed gives the same fleet).")
@pass_state
def generate_cmd(st: State, n_vms: int, n_hosts: int, output: Path, fmt: str, seed: int) -> None:
    """Generate a synthetic fleet over catalog models: a mix of Intel and AMD server generations in clusters;
    VMs booted with their cluster's models, reporting what a Linux guest there relies on, or unenlightened."""
    from pvmit.fleet.generate import generate, write_inventory

    hosts, vms = generate(st.catalog, n_vms, n_hosts, seed)
    try:
        paths = write_inventory(hosts, vms, output, fmt)
    except OSError as e:
        raise InputError(f"{e.filename or output}: cannot write the inventory: {e.strerror or e}") from None
    err.print(esc(f"pvmit: wrote {n_hosts:,} hosts and {n_vms:,} VMs to {', '.join(map(str, paths))}"))


@fleet.command("sample")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="FILE",
              help="Copy the sample inventory here (default: write it on stdout).")
@click.option("--path", "show_path", is_flag=True, help="Print where the installed sample is instead.")
def sample_cmd(output: Path | None, show_path: bool) -> None:
    """The sample inventory shipped with pvmit: a few hundred VMs over a mixed fleet of catalog models."""
    from pvmit.fleet.generate import sample_path

    src = sample_path()
    if show_path:
        out.print(esc(str(src)), soft_wrap=True)
    elif output is None:
        sys.stdout.write(src.read_text(encoding="utf-8"))
    else:
        try:
            write_atomic(output, src.read_bytes())
        except OSError as e:
            raise InputError(f"{output}: cannot write: {e.strerror or e}") from None
        err.print(esc(f"pvmit: wrote {output}"))
