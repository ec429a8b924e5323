"""Driving `pvmit vmm` processes from outside: start one, read what it prints, command it, stop it.

Used by `pvmit demo`, `pvmit bench migrate` and the migration tests, so that all of them exercise real, separate
VMM processes talking over sockets.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvmit.errors import PvmitError
from pvmit.net.tls import Credentials
from pvmit.node.control import request as control_request

COUNT = re.compile(r"^guest: count 0x([0-9a-f]+) spec_ctrl 0x([0-9a-f]+) gp 0x[0-9a-f]+$", re.M)
PAUSED = re.compile(r"^vmm: paused at monotonic ([0-9.]+)", re.M)
RESUMED = re.compile(r"^vmm: resumed at monotonic ([0-9.]+)", re.M)


STARTED: list[subprocess.Popen[bytes]] = []
"""Every VMM process started here, so that a test harness can make sure none outlives its test."""


def kill_leftovers() -> int:
    """Kill every VMM process started here that is still running (a test that failed before its cleanup);
    returns how many there were."""
    n = 0
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()
            n += 1
    return n


class VmmHandle:
    """One `pvmit vmm` process, its log file and its control socket (a Unix socket in `workdir` unless `control`
    names another address; `creds` is a TLS credentials directory for TCP endpoints; `prefix` runs the process
    under another command, such as `ip netns exec NAME`)."""

    def __init__(self, workdir: Path, name: str, args: list[str], *, catalogs: list[str] | None = None,
                 timeout: float = 60, control: str | None = None, creds: Path | None = None,
                 prefix: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.control = control or f"unix:{workdir / f'{name}.ctl'}"
        self.creds = Credentials.load(creds, roles=("client",)) if creds else None
        pre = [x for c in (catalogs or []) for x in ("--catalog", c)]
        tls = ["--tls-creds", str(creds)] if creds else []
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "pvmit", *pre, "vmm", "--control",
                                      self.control, *tls, *args],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        STARTED.append(self.proc)
        deadline = time.monotonic() + timeout
        ready = "vmm: control socket" if not args or "--incoming" not in args else "vmm: incoming migrations at"
        while ready not in self.text():
            if self.proc.poll() is not None:
                raise PvmitError(f"VMM {name} exited with status {self.proc.returncode}:\n{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise PvmitError(f"VMM {name} did not start within {timeout} s")
            time.sleep(0.05)

    def request(self, doc: dict[str, Any], on_event: Callable[[dict[str, Any]], None] = lambda d: None,
                timeout: float = 600) -> dict[str, Any]:
        return control_request(self.control, doc, on_event, creds=self.creds, timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def counts(self) -> list[int]:
        return [int(m, 16) for m, _ in COUNT.findall(self.text())]

    def monotonic(self, pattern: re.Pattern[str]) -> float | None:
        found = pattern.findall(self.text())
        return float(found[-1]) if found else None

    def status(self) -> dict[str, Any]:
        try:
            return self.request({"cmd": "status"}, timeout=30)
        except (ConnectionError, OSError, PvmitError):
            return {"state": "gone"}

    def migrate(self, to: str, *, check: bool = False, fault: str | None = None,
                on_event: Callable[[dict[str, Any]], None] = lambda d: None) -> dict[str, Any]:
        answer = self.request({"cmd": "migrate", "to": to, "check": check, "fault": fault}, on_event)
        if not answer.get("ok"):
            raise PvmitError(f"{self.name}: {answer.get('error')}")
        result = answer["result"]
        assert isinstance(result, dict)
        return result

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise PvmitError(f"{self.name}: timed out waiting for {what}:\n{self.text()[-1500:]}")
            time.sleep(0.05)

    def wait_counts(self, n: int, timeout: float = 30) -> None:
        start = len(self.counts())
        self.wait_for(lambda: len(self.counts()) >= start + n, f"{n} heartbeats", timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"cmd": "quit", "force": True}, timeout=10)
            except (ConnectionError, OSError, PvmitError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
