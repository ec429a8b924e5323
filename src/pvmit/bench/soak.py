"""`pvmit bench soak`: several VMM processes, guests counting, and faults thrown at them at random for a while.

Hosts: `pvmit vmm` processes that all take guests in (--incoming), one an Ice Lake stand-in where the guests boot,
the others Sapphire Rapids stand-ins (where the guests' retpoline needs RRSBA_DIS_S forced) and one Cascade Lake
stand-in (which must refuse them). Then, at random, until the time is up:

- live migrations between hosts, back and forth;
- destinations killed (SIGKILL) during pre-copy and after the source paused, then restarted;
- destinations stopped (SIGSTOP) for longer than the stall limit, then continued;
- faults injected into the stream or the commit (flipped bits, cut streams, wrong versions, a commit lost before,
  during or after CMIT, a source dying just before or after it);
- hostile control clients (connect and close, junk, a line far over the limit) and crafted migration streams.

It checks, from every VMM's log and status: guests lost 0 (each runs on one host at the end), guests running twice
0 (no two hosts report the same guest running, and no count is seen twice), gaps or repeats 0 in any guest's count
read across every log in time order, promise violations 0 (a guest on a Sapphire Rapids host has RRSBA_DIS_S
forced), tracebacks 0; and counts what it injected. The test suite runs it briefly; `--minutes N` for longer.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvmit.migration.source import FAULT_ENV
from pvmit.migration.stream import encode_header, encode_json
from pvmit.node.cluster import VmmHandle
from pvmit.node.process import DEFAULT_HEARTBEAT

GUEST = ["--guest-cpu", "icelake-server-v2", "--pool", "sapphirerapids", "--memory", "16M"]
RRSBA_DIS_S = 0x40
STREAM_FAULTS = ("flip-memory", "flip-state", "truncate", "wrong-version", "unknown-section", "stop-and-copy")
COMMIT_FAULTS = ("drop-before-commit", "lose-commit-ack", "die-before-commit", "die-after-commit")
MARK = re.compile(r"^vmm: (?:booted .*; vm ([0-9a-f]+) running at monotonic ([0-9.]+)"
                  r"|resumed at monotonic ([0-9.]+); vm ([0-9a-f]+) running"
                  r"|vm ([0-9a-f]+) running at monotonic ([0-9.]+) \(resumed on the source\)"
                  r"|paused at monotonic ([0-9.]+)"
                  r"|vm ([0-9a-f]+) left for)")
COUNT = re.compile(r"^guest: count 0x([0-9a-f]+) spec_ctrl 0x[0-9a-f]+ gp 0x[0-9a-f]+$")


@dataclass
class Host:
    name: str
    cpu: str
    work: Path
    boots: bool = False
    handle: VmmHandle | None = None
    incarnation: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def mig(self) -> str:
        return f"unix:{self.work / f'{self.name}.mig'}"

    def start(self, fault: str | None = None, boot: bool = False) -> None:
        self.incarnation += 1
        args = ["--incoming", self.mig, "--host-cpu", self.cpu, "--stall", "2", "--settle-notice", "3",
                "--deadline", "30"]
        if boot or (self.boots and self.incarnation == 1):
            args += GUEST
        if fault:
            args += ["--fault", fault]
        self.handle = VmmHandle(self.work, f"{self.name}-{self.incarnation}", args,
                                control=f"unix:{self.work / f'{self.name}.ctl'}",
                                env={**os.environ, FAULT_ENV: "1"})
        self.logs.append(self.handle.log)

    def alive(self) -> bool:
        return self.handle is not None and self.handle.proc.poll() is None

    def status(self) -> dict[str, Any]:
        return self.handle.status() if self.handle is not None and self.alive() else {"state": "gone"}


@dataclass
class Report:
    seconds: float = 0.0
    injected: Counter[str] = field(default_factory=Counter)
    migrations: int = 0
    guests: int = 0
    guests_lost: int = 0
    running_twice: int = 0
    gaps: int = 0
    repeats: int = 0
    promise_violations: int = 0
    tracebacks: int = 0
    counts_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.guests_lost or self.running_twice or self.gaps or self.repeats or self.promise_violations
                    or self.tracebacks)

    def to_json(self) -> dict[str, Any]:
        return {"schema": "pvmit.bench-soak/1", "seconds": round(self.seconds, 1), "ok": self.ok,
                "guests": self.guests, "migrations_committed": self.migrations,
                "counts_checked": self.counts_checked, "guests_lost": self.guests_lost,
                "guests_running_twice": self.running_twice, "count_gaps": self.gaps, "count_repeats": self.repeats,
                "promise_violations": self.promise_violations, "tracebacks": self.tracebacks,
                "injected": dict(sorted(self.injected.items())), "problems": self.problems[:50]}


class Soak:
    def __init__(self, work: Path, *, guests: int = 2, sapphire: int = 2, seed: int | None = None,
                 progress: Callable[[str], None] = lambda m: None) -> None:
        self.rng = random.Random(seed)
        self.progress = progress
        self.report = Report(guests=guests)
        self.killed: set[str] = set()  # guests that went down with a host killed after their commit
        self.hosts = [Host(f"ice{i}", "icelake-sp", work, boots=True) for i in range(guests)]
        self.hosts += [Host(f"spr{i}", "sapphirerapids", work) for i in range(sapphire)]
        self.hosts.append(Host("clx", "cascadelake-sp", work))
        for h in self.hosts:
            h.start()
        for h in self.hosts[:guests]:
            assert h.handle is not None
            h.handle.wait_counts(2, timeout=120)

    # --- the faults --------------------------------------------------------------------------------------------
    def _running(self) -> list[Host]:
        return [h for h in self.hosts if h.status().get("state") == "running"]

    def _idle(self, exclude: Host) -> list[Host]:
        return [h for h in self.hosts if h is not exclude and h.status().get("state") == "waiting"]

    def _migrate(self, src: Host, dst: Host, fault: str | None = None,
                 on_event: Callable[[dict[str, Any]], None] = lambda d: None) -> dict[str, Any] | None:
        assert src.handle is not None
        try:
            result = src.handle.migrate(dst.mig, fault=fault, on_event=on_event)
        except Exception as e:  # noqa: BLE001 - a source that died on purpose closes the control connection
            return {"migrated": False, "reason": str(e)}
        if result.get("migrated"):
            self.report.migrations += 1
        return result

    def _restart(self, h: Host, fault: str | None = None) -> None:
        """Replace an idle host's process (to give it a fault to act on)."""
        if h.handle is not None:
            h.handle.stop()
        h.start(fault)

    def _restart_dead(self) -> None:
        """Start again what died; boot a new guest for each that went down with its host."""
        for h in self.hosts:
            if h.handle is not None and not h.alive():
                h.start()
        missing = self.report.guests + len(self.killed) - len(self._segments_started())
        for h in self.hosts:
            if missing <= 0:
                break
            if h.cpu == "icelake-sp" and h.status().get("state") == "waiting":
                assert h.handle is not None
                h.handle.stop()
                h.start(boot=True)
                h.handle.wait_counts(1, timeout=60)
                self.report.injected["guest booted to replace one killed with its host"] += 1
                missing -= 1

    def _segments_started(self) -> set[str]:
        """Every guest booted so far, from the logs."""
        booted = set()
        for h in self.hosts:
            for log in h.logs:
                booted |= set(re.findall(r"^vmm: booted .*; vm ([0-9a-f]+) running", log.read_text(errors="replace"),
                                         re.M))
        return booted

    def step(self) -> None:
        running = self._running()
        action = self.rng.choice(["migrate", "migrate", "stream-fault", "commit-fault", "kill-mid-copy",
                                  "kill-after-pause", "sigkill", "stall", "hostile-control", "crafted-stream",
                                  "refused"])
        if action in ("hostile-control", "crafted-stream"):
            self._hostile(action)
            return
        if not running:
            return
        src = self.rng.choice(running)
        candidates = [h for h in self._idle(src) if h.cpu != "cascadelake-sp" or action == "refused"]
        if action == "refused":
            candidates = [h for h in candidates if h.cpu == "cascadelake-sp"]
        elif action != "migrate":
            candidates = [h for h in candidates if h.cpu != "icelake-sp"] or candidates
        if not candidates:
            return
        dst = self.rng.choice(candidates)
        self.report.injected[action] += 1
        if action in ("migrate", "refused"):
            self._migrate(src, dst)
        elif action == "stream-fault":
            fault = self.rng.choice(STREAM_FAULTS)
            self.report.injected[f"stream-fault {fault}"] += 1
            self._migrate(src, dst, fault)
        elif action == "commit-fault":
            fault = self.rng.choice(COMMIT_FAULTS)
            self.report.injected[f"commit-fault {fault}"] += 1
            self._migrate(src, dst, fault)
        elif action in ("kill-mid-copy", "kill-after-pause"):
            # the destination dies at that exact point (os._exit, as SIGKILL would), before it can commit
            fault = "die-after-pages" if action == "kill-mid-copy" else "die-after-state"
            self._restart(dst, fault)
            self._migrate(src, dst)
        elif action == "sigkill":  # SIGKILL at whatever point the migration has reached by then
            delay = self.rng.uniform(0, 0.1)
            assert dst.handle is not None
            pid = dst.handle.proc.pid
            timer = threading.Timer(delay, lambda: os.kill(pid, signal.SIGKILL))
            timer.start()
            result = self._migrate(src, dst)
            timer.join()
            if result and result.get("migrated"):  # it died after the commit: the guest went down with its host
                vm = str(result.get("vm") or "")
                self.report.injected["sigkill after the commit (guest killed with its host)"] += 1
                self.killed.add(vm)
        elif action == "stall":
            stopped: list[int] = []

            def stop(doc: dict[str, Any]) -> None:
                if str(doc.get("event", "")).startswith("pre-copy round 1") and dst.alive() and not stopped:
                    assert dst.handle is not None
                    stopped.append(dst.handle.proc.pid)
                    os.kill(dst.handle.proc.pid, signal.SIGSTOP)
                    threading.Timer(3.0, lambda: os.kill(stopped[0], signal.SIGCONT)).start()

            self._migrate(src, dst, on_event=stop)
            if stopped:
                time.sleep(3.5)  # until the SIGCONT: a stopped host answers nothing
        self._restart_dead()

    def _hostile(self, action: str) -> None:
        target = self.rng.choice([h for h in self.hosts if h.alive()])
        self.report.injected[action] += 1
        path = str(target.work / f"{target.name}.ctl") if action == "hostile-control" else target.mig[5:]
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
                s.recv(1)
                if action == "hostile-control":
                    s.sendall(self.rng.choice([b"", b"\x00\xff junk\n", b"{" * 70000, b'{"cmd": 1e999}\n',
                                               b'{"cmd": "resolve", "action": "run"}\n', b"x" * 100000]))
                else:
                    s.sendall(encode_header({"vm": {"memory_size": float("inf"), "vcpus": None}})
                              + encode_json(b"HELO", {}))
                    s.recv(4096)
        except OSError:
            pass

    # --- the checks --------------------------------------------------------------------------------------------
    def check_now(self) -> None:
        """No guest reported running by two hosts at once; every running guest on Sapphire Rapids is protected."""
        seen: dict[str, str] = {}
        for h in self.hosts:
            st = h.status()
            if st.get("state") != "running":
                continue
            vm = str(st.get("vm"))
            if vm in seen:
                self.report.running_twice += 1
                self.report.problems.append(f"vm {vm} running on {seen[vm]} and {h.name}")
            seen[vm] = h.name
            mask = int(str((st.get("spec_ctrl") or {}).get("forced_mask", "0x0")), 16)
            if h.cpu == "sapphirerapids" and not mask & RRSBA_DIS_S:
                self.report.promise_violations += 1
                self.report.problems.append(f"vm {vm} on {h.name} without RRSBA_DIS_S forced (mask {mask:#x})")

    def finish(self) -> Report:
        """Let in-doubt migrations settle, then read every log."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [h.status().get("state") for h in self.hosts]
            if not any(s in ("migrating", "paused", "in-doubt", "receiving") for s in states):
                break
            time.sleep(0.2)
        self.check_now()
        running = {str(h.status().get("vm")) for h in self.hosts if h.status().get("state") == "running"}
        segments: dict[str, list[tuple[float, list[int]]]] = {}
        for h in self.hosts:
            for log in h.logs:
                text = log.read_text(errors="replace")
                self.report.tracebacks += text.count("Traceback")
                current: list[int] | None = None
                for line in text.splitlines():
                    m = MARK.match(line)
                    if m:
                        vm = m.group(1) or m.group(4) or m.group(5)
                        start = m.group(2) or m.group(3) or m.group(6)
                        if vm and start:
                            current = []
                            segments.setdefault(vm, []).append((float(start), current))
                        else:
                            current = None
                        continue
                    c = COUNT.match(line)
                    if c and current is not None:
                        current.append(int(c.group(1), 16))
        for vm, segs in segments.items():
            counts = [n for _, seg in sorted(segs, key=lambda s: s[0]) for n in seg]
            self.report.counts_checked += len(counts)
            for a, b in zip(counts, counts[1:]):
                if b - a == DEFAULT_HEARTBEAT:
                    continue
                if b <= a:
                    self.report.repeats += 1
                else:
                    self.report.gaps += 1
                self.report.problems.append(f"vm {vm}: count {a:#x} followed by {b:#x}")
        lost = set(segments) - running - self.killed
        self.report.guests_lost = len(lost)
        self.report.problems += [f"vm {vm} runs nowhere" for vm in sorted(lost)]
        return self.report

    def stop(self) -> None:
        for h in self.hosts:
            if h.handle is not None:
                if h.alive():
                    os.kill(h.handle.proc.pid, signal.SIGCONT)
                h.handle.stop()


def run(work: Path, seconds: float, *, guests: int = 2, sapphire: int = 2, seed: int | None = None,
        progress: Callable[[str], None] = lambda m: None) -> Report:
    start = time.monotonic()
    soak = Soak(work, guests=guests, sapphire=sapphire, seed=seed, progress=progress)
    try:
        n = 0
        while time.monotonic() - start < seconds:
            soak.step()
            soak.check_now()
            n += 1
            if n % 10 == 0:
                progress(f"{time.monotonic() - start:.0f} s: {soak.report.migrations} migrations committed, "
                         f"{sum(v for k, v in soak.report.injected.items() if ' ' not in k)} actions")
        report = soak.finish()
    finally:
        soak.stop()
    report.seconds = time.monotonic() - start
    return report


__all__ = ["Report", "Soak", "run"]
