"""Booting one case: qemu-system-x86_64 with TCG, the kernel under test and the oracle's initramfs, and reading
what the guest printed between the markers of its /init (see `initramfs.INIT`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvmit.errors import PvmitError
from pvmit.oracle.cases import Case
from pvmit.oracle.initramfs import BEGIN, END, Kernel, OracleUnavailable

BASE_APPEND = "console=ttyS0 panic=-1 loglevel=1"
"""What every boot's kernel command line starts with: the serial console, power off on panic, quiet."""


class BootFailed(PvmitError):
    """A boot did not print what /init prints; the message has the end of the serial output."""


@dataclass
class Seen:
    """What one boot printed."""

    release: str = ""
    version: str = ""
    cmdline: str = ""
    vulnerabilities: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    bugs: list[str] = field(default_factory=list)
    lockdown: str = ""
    agent: dict[str, Any] | None = None
    agent_exit: int | None = None
    agent_stderr: list[str] = field(default_factory=list)
    seconds: float = 0.0


def find_qemu(path: str | None = None) -> str:
    found = shutil.which(path or "qemu-system-x86_64")
    if found is None:
        raise OracleUnavailable(f"{path or 'qemu-system-x86_64'} not found: apt-get install qemu-system-x86")
    return found


def qemu_version(qemu: str) -> str:
    p = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    return p.stdout.splitlines()[0].strip() if p.stdout else "unknown"


def command(qemu: str, kernel: Kernel, initrd: Path, case: Case) -> list[str]:
    return [qemu, "-accel", "tcg", "-cpu", case.cpu, "-smp", "1", "-m", "512", "-display", "none", "-nodefaults",
            "-no-user-config", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel.image), "-initrd", str(initrd),
            "-append", f"{BASE_APPEND} {case.cmdline}".strip()]


def parse(output: str) -> Seen:
    """The markers' lines of the serial output; BootFailed if /init did not get to its end marker."""
    lines = [ln.rstrip("\r") for ln in output.splitlines()]
    try:
        start, stop = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise BootFailed("the guest did not finish its /init; last output:\n" + "\n".join(lines[-25:])) from None
    seen, agent_json = Seen(), []
    for ln in lines[start + 1:stop]:
        key, _, rest = ln.partition(" ")
        if key == "@@release":
            seen.release = rest
        elif key == "@@version":
            seen.version = rest
        elif key == "@@cmdline":
            seen.cmdline = rest
        elif key == "@@vuln":
            name, _, text = rest.partition(" ")
            seen.vulnerabilities[name] = text
        elif key == "@@flags":
            seen.flags = rest.split()
        elif key == "@@bugs":
            seen.bugs = rest.split()
        elif key == "@@lockdown":
            seen.lockdown = rest
        elif key == "@@agent-exit":
            seen.agent_exit = int(rest) if rest.isdigit() else None
        elif key == "@@agent-json":
            agent_json.append(rest)
        elif key == "@@agent-err":
            seen.agent_stderr.append(rest)
    if agent_json:
        try:
            doc = json.loads("\n".join(agent_json))
        except (ValueError, RecursionError) as e:
            raise BootFailed(f"the agent's JSON in the guest did not parse ({e}); stderr: "
                             f"{' | '.join(seen.agent_stderr)}") from None
        if not isinstance(doc, dict):
            raise BootFailed("the agent's JSON in the guest is not an object")
        seen.agent = doc
    return seen


def boot(qemu: str, kernel: Kernel, initrd: Path, case: Case, timeout: float) -> Seen:
    """Boot `case` and read what the guest printed."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(command(qemu, kernel, initrd, case), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"").decode("utf-8", "replace").splitlines()[-15:]
        raise BootFailed(f"{case.id}: no power-off within {timeout:.0f} s; last output:\n" + "\n".join(tail)) from None
    out = p.stdout.decode("utf-8", "replace")
    try:
        seen = parse(out)
    except BootFailed as e:
        raise BootFailed(f"{case.id}: qemu exit {p.returncode}: {e}\n{p.stderr.decode('utf-8', 'replace')[-600:]}") \
            from None
    seen.seconds = round(time.monotonic() - t0, 1)
    return seen
