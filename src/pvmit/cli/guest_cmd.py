"""`pvmit guest status|report|install`: the guest agent from the main CLI. status and report are the agent's own
command line (`python3 -m pvmit.agent`), so a guest with the full package and one with only the agent's files
behave the same."""

from __future__ import annotations

from pathlib import Path

import click

from pvmit.agent import main as agent
from pvmit.agent.bundle import LIB_DIR, UNIT_NAME, install
from pvmit.agent.errors import status_table
from pvmit.cli.output import emit_json, err, esc
from pvmit.cli.state import json_option
from pvmit.errors import PvmitError

EPILOG = "\b\nExit status (status, report):\n" + status_table()


@click.group("guest")
def guest() -> None:
    """Run inside a Linux guest, as root: report the software Spectre mitigations the running kernel relies on to
    the hypervisor through the mitigation interface (the agent; also `python3 -m pvmit.agent`)."""


def _agent_command(name: str, summary: str) -> click.Command:
    @click.command(name, help=summary, epilog=EPILOG)
    @click.option("--dry-run", is_flag=True, help="Decide and check everything, write nothing.")
    @json_option
    def cmd(dry_run: bool, json_out: bool) -> int:
        return agent.main([name] + (["--dry-run"] if dry_run else []) + (["--json"] if json_out else []))

    return cmd


guest.add_command(_agent_command(
    "status", "What the kernel relies on, which form of the interface the hypervisor offers, and whether every "
              "online CPU's CTRL register holds it. Writes nothing."))
guest.add_command(_agent_command(
    "report", "Write the request bits for what the kernel relies on to the CTRL register of every online CPU and "
              "read them back (--dry-run: decide and check, write nothing)."))


@guest.command("install", help=f"Install the agent's files under ROOT/{LIB_DIR} and its systemd unit {UNIT_NAME} "
                                f"under ROOT/etc/systemd/system; then enable it: systemctl [--root ROOT] enable "
                                f"{UNIT_NAME}. Needs only python3 in the guest at run time.")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=Path("/"), show_default=True,
              help="Install into this root directory (a guest image mounted on the host, for example).")
@json_option
def install_cmd(root: Path, json_out: bool) -> None:
    try:
        written = install(root)
    except OSError as e:
        raise PvmitError(f"cannot install into {root}: {e.strerror or e}") from None
    if json_out:
        emit_json({"schema": "pvmit.guest-install/1", "root": str(root), "written": [str(p) for p in written]})
        return
    for p in written:
        err.print(esc(f"wrote {p}"))
    err.print(esc(f"enable it: systemctl {'--root ' + str(root) + ' ' if root != Path('/') else ''}"
                  f"enable {UNIT_NAME}"))
