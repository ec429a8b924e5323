"""`python3 -m pvmit.agent status|report [--dry-run] [--json]`: the agent's command line (argparse: the agent
runs with the standard library only). `pvmit guest` in the main CLI calls `main` too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn, TextIO

from pvmit.agent.cpuiddev import open_cpuid
from pvmit.agent.discover import Cpuid
from pvmit.agent.errors import Status, status_table
from pvmit.agent.msrdev import MSR_ALLOW_WRITES, MsrDevices, kernel_file, lockdown_state, online_cpus, read_param
from pvmit.agent.run import Machine, Msr, run
from pvmit.safetext import clean_message, safe_text

DESCRIPTION = """\
Tell the hypervisor which software Spectre mitigations this Linux kernel relies on (retpoline; the short
BHB-clearing loop), so it can force the IA32_SPEC_CTRL controls that make up for them wherever the guest runs.
  status  what the kernel relies on, which form of the interface is offered, and whether every online CPU's
          CTRL register already holds it (writes nothing)
  report  write the request bits to the CTRL register of every online CPU and read them back
Runs as root; needs the msr module (modprobe msr) and CPUID (the cpuid module, else the CPUID instruction)."""


class LinuxMachine:
    """The running Linux system."""

    def euid(self) -> int:
        return os.geteuid()

    def release(self) -> str:
        return os.uname().release

    def read(self, path: str) -> str | None:
        text = kernel_file(path)
        return None if text is None else text.strip()

    def cpuid(self) -> tuple[Cpuid, str]:
        source = open_cpuid()
        return source, source.method

    def msr(self) -> Msr:
        return MsrDevices()

    def online_cpus(self) -> list[int]:
        return online_cpus()

    def lockdown(self) -> str | None:
        return lockdown_state()

    def allow_writes(self) -> str | None:
        return read_param(MSR_ALLOW_WRITES)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's usage error, with what was given escaped and shortened."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {clean_message(message)}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python3 -m pvmit.agent", description=DESCRIPTION,
                                epilog="exit status:\n" + status_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("status", "report"))
    p.add_argument("--dry-run", action="store_true", help="decide and check everything, write nothing")
    p.add_argument("--json", action="store_true", help="write one JSON document on stdout (also on failure)")
    return p


def print_text(doc: dict[str, object], out: TextIO) -> None:
    """The report for people: one line per fact."""
    def line(label: str, text: str) -> None:
        out.write(f"{label:<11}{safe_text(text)}\n")  # the kernel's lines, the hypervisor's answers: escaped

    kernel = doc.get("kernel")
    if isinstance(kernel, dict):
        line("kernel", f"{kernel['release']}: spectre_v2: {kernel['spectre_v2']}")
        if kernel.get("indirect_target_selection") is not None:
            line("", f"indirect_target_selection: {kernel['indirect_target_selection']}")
    d = doc.get("decision")
    if isinstance(d, dict):
        line("relies on", ", ".join(d["relies_on"]) or "nothing the interface covers")
        for r in d["reasons"]:
            line("", f"- {r}")
    cpu = doc.get("cpu")
    if isinstance(cpu, dict):
        line("cpu", f"{cpu['vendor']} family {cpu['family']:#x} model {cpu['model']:#x}"
                    f"{' under a hypervisor' if cpu['hypervisor'] else ''} (CPUID via {cpu['cpuid_method']})")
    iface = doc.get("interface")
    if isinstance(iface, dict):
        chosen = iface["chosen"]
        line("interface", f"{chosen['form']} form: CTRL MSR {chosen['ctrl_msr']}, supported {chosen['supported']} "
                          f"({chosen['how']})" if chosen else "not offered")
        for p in iface["probes"]:
            line("", f"- {p}")
    pool = doc.get("pool")
    if isinstance(pool, dict):
        line("pool", f"{len(pool['entries'])} CPU implementations this VM may run on (the hypervisor's list)")
        for e in pool["entries"]:
            line("", f"- {e['value']}: {'/'.join(e['cpus']) or 'unknown to pvmit'} ({e['vendor']} family "
                     f"{e['family']:#x} model {e['model']:#x}, steppings {e['stepping_min']}-{e['stepping_max']}): "
                     f"branch history {e['bhb_history']}, retpoline {e['retpoline']}")
        for p in pool["problems"]:
            line("", f"- {p}")
    for w in doc.get("warnings") or []:  # type: ignore[attr-defined]
        line("warning", f"{w['message']}")
    req = doc.get("request")
    if isinstance(req, dict):
        line("request", f"{req['value']} ({req['bits']})")
    for row in doc.get("cpus", []):  # type: ignore[attr-defined]
        text = f"holds {row['before']}" if "before" in row else ""
        if "would_write" in row:
            text += f", would write {row['would_write']}"
        if "after" in row:
            text += f", wrote, read back {row['after']}"
        if "error" in row:
            text += f"{', ' if text else ''}{row['error']}"
        line(f"cpu {row['cpu']}", text)


def main(argv: list[str] | None = None, machine: Machine | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the agent; the exit status (see --help). Messages go to `err`, the report to `out`."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    doc, status = run(args.command, args.dry_run, machine or LinuxMachine())
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        print_text(doc, out)
    outcome = doc["outcome"]
    assert isinstance(outcome, dict)
    if outcome["error"]:
        err.write(f"pvmit-agent: error: {clean_message(str(outcome['error']))}\n")
    elif status is Status.OK and args.command == "report" and not args.dry_run:
        err.write("pvmit-agent: reported to the hypervisor on every online CPU\n")
    return int(status)
