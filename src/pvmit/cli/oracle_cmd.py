"""`pvmit oracle linux`: pvmit's model of Linux against Debian's own kernel booted under QEMU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from pvmit.cli.output import emit_json, err, esc, out
from pvmit.cli.params import BoundedFloat, BoundedInt
from pvmit.cli.state import State, json_option, pass_state
from pvmit.oracle import linux
from pvmit.oracle.cases import select
from pvmit.safetext import safe_text


@click.group("oracle")
def oracle() -> None:
    """Check pvmit's models against real systems."""


@oracle.command("linux")
@click.option("--cases", "names", metavar="IDS", help="Comma-separated case ids or QEMU CPU models (default: all; "
                                                      "`--cases list` lists them).")
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=False),
              help="Kernel image to boot (default: the newest /boot/vmlinuz-*, from linux-image-amd64).")
@click.option("--python", type=click.Path(path_type=Path, dir_okay=False),
              help="python3 executable copied into the guest (default: /usr/bin/python3, python3-minimal).")
@click.option("--qemu", metavar="PATH", help="qemu-system-x86_64 to run (default: the one on PATH).")
@click.option("--jobs", type=BoundedInt(1, 64), help="Boots at a time (default: CPUs, at most 4).")
@click.option("--timeout", type=BoundedFloat(5, 3600), default=120, show_default=True,
              help="Seconds one boot may take.")
@click.option("--record", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the results to FILE (the test fixture is tests/fixtures/linux_oracle.json).")
@click.option("--markdown", is_flag=True, help="Print the results as the Markdown table of docs/linux-guests.md.")
@json_option
@pass_state
def linux_cmd(st: State, names: str | None, kernel: Path | None, python: Path | None, qemu: str | None,
              jobs: int | None, timeout: float, record: Path | None, markdown: bool, json_out: bool) -> int:
    """Boot Debian's kernel under qemu-system-x86_64 (TCG) on an initramfs with busybox and the guest agent, for
    QEMU CPU models crossed with kernel command lines; compare what the kernel chose and what the agent decided
    with pvmit's prediction. Exit 0 when every case is as expected (agreement, or a documented disagreement), 1
    otherwise."""
    if names == "list":
        for c in select(None):
            out.print(esc(f"{c.id:<42} -cpu {c.cpu:<20} {c.cmdline or '(no options)'}"))
        return 0
    cases = select(names)
    doc = linux.run(cases, st.catalog, kernel=kernel, python=python, qemu=qemu, jobs=jobs, timeout=timeout,
                    progress=lambda s: err.print(esc(f"pvmit: {s}")))
    if record:
        linux.record(doc, record)
        err.print(esc(f"pvmit: recorded {len(doc['cases'])} case(s) in {record}"))
    if json_out:
        emit_json(doc)
    elif markdown:
        click.echo(safe_text(linux.markdown_table(doc), lines=True))
    else:
        print_table(doc)
    return 0 if linux.ok(doc) else 1


def print_table(doc: dict[str, Any]) -> None:
    k = doc["kernel"]
    out.print(esc(f"kernel {k['release']} ({k['package'] or k['version']}), {doc['qemu']}, accel {doc['accel']}"))
    t = Table(title="Linux oracle: kernel's choice vs pvmit's prediction")
    for col in ("case", "-cpu", "command line", "kernel printed", "pvmit predicts", "agent (in guest)", "agree"):
        t.add_column(col)
    for r in doc["cases"]:
        line = r["observed"]["sysfs"]["spectre_v2"]
        head = line.split(";")[0]
        bhi = next((f for f in line.split("; ") if f.startswith("BHI:")), "no BHI field")
        p = r["prediction"]
        agent = r["observed"]["agent"]
        t.add_row(esc(r["id"]), esc(r["cpu"]), esc(r["cmdline"] or "-"), esc(f"{head}; {bhi}"),
                  esc(f"{p['sysfs_mode']}; {p['sysfs_bhi']}"),
                  esc(f"{','.join(agent['relies_on'] or []) or 'nothing'} (exit {agent['exit_status']})"),
                  esc(linux.verdict(r)))
    out.print(t)
    for f in doc["failures"]:
        out.print(esc(f"{f['id']}: {f['error']}"))
    s = doc["summary"]
    out.print(esc(f"{s['cases']} cases: {s['agree']} agree, {s['known_disagreements']} known disagreement(s), "
                  f"unexpected: {', '.join(s['unexpected']) or 'none'}, failed boots: "
                  f"{', '.join(s['failed_boots']) or 'none'}"))
