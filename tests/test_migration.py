"""Live migration between two real `pvmit vmm` processes on /dev/kvm, with failures injected on purpose.

Each test starts a source VMM (the counting guest) and a destination VMM (--incoming) as separate processes,
migrates with `pvmit migrate`, and reads both processes' output: the guest's heartbeats must continue on the
destination exactly where they stopped on the source, or, when the move fails, continue on the source.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvmit.kvm.system import kvm_available
from pvmit.vmm.cluster import VmmHandle
from pvmit.vmm.process import DEFAULT_HEARTBEAT

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
@pytest.fixture
def pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs: list[VmmHandle] = []

    def make(source: list[str], dest: list[str]) -> tuple[VmmHandle, VmmHandle, str]:
        src = VmmHandle(tmp_path, "src", source)
        dst = VmmHandle(tmp_path, "dst", ["--incoming", f"unix:{tmp_path / 'dst.mig'}", *dest])
        procs.extend([src, dst])
        src.wait_counts(3)
        return src, dst, f"unix:{tmp_path / 'dst.mig'}"

    yield make
    for p in procs:
        p.stop()


def migrate(src: VmmHandle, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvmit", "migrate", "--from", src.control, "--to", to, "--json",
                           *extra], capture_output=True, text=True, timeout=120, check=False)


RETPOLINE_GUEST = ["--guest-cpu", "icelake-server-v2", "--host-cpu", "icelake-sp", "--pool", "sapphirerapids",
                   "--memory", "64M"]


def test_live_migration_carries_the_guest_and_forces_what_it_needs(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    assert src.status()["spec_ctrl"]["forced_mask"] == "0x0"  # retpoline is effective on Ice Lake
    r = migrate(src, to)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["migrated"] and doc["mode"] == "pre-copy" and doc["ready"]["forced"] == ["RRSBA_DIS_S"]
    dst.wait_counts(3)
    assert src.status()["state"] == "migrated"
    st = dst.status()
    assert st["state"] == "running" and st["spec_ctrl"]["forced_mask"] == "0x40"
    assert st["spec_ctrl"]["guest_value"] == "0x0"  # the guest still reads its own IA32_SPEC_CTRL
    before, after = src.counts(), dst.counts()
    assert after[0] == before[-1] + DEFAULT_HEARTBEAT, (before[-3:], after[:3])  # nothing lost, nothing repeated
    assert all(b - a == DEFAULT_HEARTBEAT for a, b in zip(after, after[1:]))
    assert "forced IA32_SPEC_CTRL RRSBA_DIS_S" in dst.text()


def test_refused_before_the_pause_and_the_source_keeps_running(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "cascadelake-sp"])
    check = migrate(src, to, "--check")
    assert check.returncode == 1 and not json.loads(check.stdout)["accepted"]
    r = migrate(src, to)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert not doc["migrated"] and doc["paused_at"] is None
    assert "RRSBA_CTRL" in doc["reason"] and "retpoline" in doc["reason"]
    n = len(src.counts())
    src.wait_counts(2)
    assert src.status()["state"] == "running" and dst.status()["state"] == "waiting"
    counts = src.counts()
    assert all(b - a == DEFAULT_HEARTBEAT for a, b in zip(counts[n - 1:], counts[n:]))


def test_check_only_moves_nothing(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    r = migrate(src, to, "--check")
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"]
    src.wait_counts(2)
    assert src.status()["state"] == "running" and dst.status()["state"] == "waiting"


FAULTS = [
    ("flip-memory", "checksum mismatch"),
    ("flip-state", "checksum mismatch"),
    ("truncate", "truncated stream"),
    ("wrong-version", "version 99 is not supported"),
    ("unknown-section", "unknown section kind b'XTRA'"),
]


@pytest.mark.parametrize("fault,expected", FAULTS)
def test_a_bad_stream_leaves_the_guest_on_the_source(pair, fault: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    r = migrate(src, to, "--fault", fault)
    assert r.returncode == 1, r.stdout + r.stderr
    assert not json.loads(r.stdout)["migrated"]
    src.wait_counts(2)
    assert src.status()["state"] == "running"
    assert dst.status()["state"] == "waiting" and expected in dst.text()


def test_destination_killed_mid_stream(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids", "--fault", "die-after-pages"])
    r = migrate(src, to)
    assert r.returncode == 1 and "migration failed" in json.loads(r.stdout)["reason"]
    assert dst.proc.wait(10) == 9
    src.wait_counts(2)
    assert src.status()["state"] == "running"


def test_source_killed_after_pausing_starts_nothing(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    migrate(src, to, "--fault", "die-after-pause")
    assert src.proc.wait(10) == 9
    deadline = time.monotonic() + 10
    while "went away before committing" not in dst.text() and "truncated" not in dst.text():
        assert time.monotonic() < deadline, dst.text()
        time.sleep(0.05)
    assert dst.status()["state"] == "waiting" and dst.counts() == []


def test_connection_dropped_by_the_destination(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    os.kill(dst.proc.pid, signal.SIGKILL)
    dst.proc.wait(10)
    r = migrate(src, to)
    assert r.returncode == 1 and "cannot connect" in json.loads(r.stdout)["reason"]
    src.wait_counts(2)
    assert src.status()["state"] == "running"


def test_demo_runs_the_whole_story(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("demo", "--json")
    assert r.code == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["source"]["spec_ctrl"]["forced_mask"] == "0x0"
    m = doc["migration"]
    assert m["migrated"] and m["ready"]["forced"] == ["RRSBA_DIS_S"]
    assert m["first_count_on_destination"] == m["last_count_on_source"] + DEFAULT_HEARTBEAT
    assert not doc["refusal"]["migrated"] and doc["refusal"]["paused_at"] is None
    assert any("RRSBA_CTRL" in r for r in doc["refusal"]["verdict"]["reasons"])
    assert doc["seconds"] < 60
