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
from pvmit.node.cluster import COUNT, VmmHandle
from pvmit.node.process import DEFAULT_HEARTBEAT

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
@pytest.fixture(autouse=True)
def fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VMM processes these tests start accept fault-injection requests (refused without this)."""
    monkeypatch.setenv("PVMIT_FAULT_INJECTION", "1")


def assert_continuous(counts: list[int]) -> None:
    """Heartbeats one step apart: nothing lost, nothing repeated."""
    gaps = [(a, b) for a, b in zip(counts, counts[1:]) if b - a != DEFAULT_HEARTBEAT]
    assert not gaps, gaps[:3]


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
    assert_continuous(src.counts())  # the guest resumed where it paused


def test_destination_killed_mid_stream(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids", "--fault", "die-after-pages"])
    r = migrate(src, to)
    assert r.returncode == 1 and "migration failed" in json.loads(r.stdout)["reason"]
    assert dst.proc.wait(10) == 9
    src.wait_counts(2)
    assert src.status()["state"] == "running"
    assert_continuous(src.counts())


def test_destination_killed_while_the_source_is_paused(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids", "--fault", "die-after-state"])
    r = migrate(src, to)
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["paused_at"] is not None and "migration failed" in doc["reason"]
    assert dst.proc.wait(10) == 9
    src.wait_counts(2)
    assert src.status()["state"] == "running"
    assert_continuous(src.counts())


def test_stop_and_copy(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    r = migrate(src, to, "--fault", "stop-and-copy")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["migrated"] and doc["mode"] == "stop-and-copy" and doc["rounds"] == 0
    dst.wait_counts(2)
    assert src.counts()[-1] + DEFAULT_HEARTBEAT == dst.counts()[0]
    assert_continuous(dst.counts())


def test_a_report_during_the_copy_is_decided_after_the_pause(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    r = migrate(src, to, "--fault", "report-meanwhile")  # the final state says: no longer relies on retpoline
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["migrated"] and doc["ready"]["forced"] == []
    dst.wait_counts(2)
    assert dst.status()["spec_ctrl"]["forced_mask"] == "0x0"


def test_fault_injection_is_refused_outside_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PVMIT_FAULT_INJECTION")
    src = VmmHandle(tmp_path, "src", RETPOLINE_GUEST)
    try:
        src.wait_counts(2)
        r = migrate(src, f"unix:{tmp_path / 'nobody.mig'}", "--fault", "flip-memory")
        assert r.returncode != 0 and "fault injection (flip-memory) is for tests only" in r.stderr
        assert src.status()["state"] == "running"
    finally:
        src.stop()


def test_operator_settings_travel_with_the_guest(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair([*RETPOLINE_GUEST, "--force-on", "SSBD"], ["--host-cpu", "sapphirerapids"])
    assert src.status()["spec_ctrl"]["forced_mask"] == "0x4"
    r = migrate(src, to)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dst.status()["spec_ctrl"]["forced_mask"] == "0x44"  # SSBD still forced, and RRSBA_DIS_S added here


def test_settings_given_on_the_destination_go_over_the_carried_ones(pair) -> None:  # type: ignore[no-untyped-def]
    src, dst, to = pair([*RETPOLINE_GUEST, "--force-on", "SSBD", "--unreported", "trust"],
                        ["--host-cpu", "sapphirerapids", "--force-off", "SSBD"])
    assert migrate(src, to).returncode == 0
    st = dst.status()["spec_ctrl"]
    assert (st["forced_mask"], st["forced_value"]) == ("0x44", "0x40")  # SSBD now held off, RRSBA_DIS_S on
    assert "over the VM's own" in dst.text() and "'unreported': 'trust'" in dst.text()  # the field not given stays


def test_a_silent_control_client_stalls_nothing(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import socket
    src, dst, to = pair(RETPOLINE_GUEST, ["--host-cpu", "sapphirerapids"])
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(tmp_path / "src.ctl"))  # connects and never sends a command
        src.wait_counts(2, timeout=10)
        t0 = time.monotonic()
        assert src.status()["state"] == "running" and time.monotonic() - t0 < 5
        assert migrate(src, to).returncode == 0


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
    assert m["first_count_on_destination"] == m["last_count_on_source"] + DEFAULT_HEARTBEAT and m["continued"]
    assert not doc["refusal"]["migrated"] and doc["refusal"]["paused_at"] is None
    assert any("RRSBA_CTRL" in r for r in doc["refusal"]["verdict"]["reasons"])
    assert doc["seconds"] < 60


# --- a lost commit: exactly one side runs the guest, and it continues where it stopped ---------------------------
def continuous_across(first: VmmHandle, second: VmmHandle) -> None:
    before, after = first.counts(), second.counts()
    assert after[0] == before[-1] + DEFAULT_HEARTBEAT, (before[-3:], after[:3])
    assert_continuous(after)


def wait_state(h: VmmHandle, state: str, timeout: float = 30) -> None:
    h.wait_for(lambda: h.status()["state"] == state, f"state {state}", timeout)


@pytest.mark.parametrize("fault,side,runs_on", [
    ("drop-before-commit", "source", "source"),  # no decision reached the destination: the source keeps it
    ("die-before-commit", "source", "destination"),  # the source's VMM is gone: the prepared copy is the only one
    ("lose-commit-ack", "source", "destination"),  # CMIT arrived, CACK lost: the source asks and lets go
    ("die-after-commit", "source", "destination"),
    ("lose-commit", "destination", "destination"),  # CMIT lost in flight: each asks the other, the decision holds
    ("die-after-ready", "destination", "source"),  # the destination's VMM is gone: the source resumes
    ("drop-before-cack", "destination", "destination"),
])
def test_a_lost_commit_is_settled_with_the_guest_on_exactly_one_side(pair, fault: str, side: str,
                                                                       runs_on: str) -> None:  # type: ignore[no-untyped-def]
    dest_args = ["--host-cpu", "sapphirerapids", "--settle-notice", "5"]
    if side == "destination":
        dest_args += ["--fault", fault]
    src, dst, to = pair([*RETPOLINE_GUEST, "--settle-notice", "5"], dest_args)
    r = migrate(src, to, *(["--fault", fault] if side == "source" else []))
    assert "Traceback" not in r.stderr + src.text() + dst.text()
    if runs_on == "destination":
        wait_state(dst, "running")
        dst.wait_counts(3)
        continuous_across(src, dst)
        if src.proc.poll() is None:
            assert src.status()["state"] == "migrated"
    else:
        src.wait_counts(3)
        assert src.status()["state"] == "running"
        assert_continuous(src.counts())
        if dst.proc.poll() is None:
            wait_state(dst, "waiting")
            assert dst.counts() == []


def test_a_stalled_destination_never_pauses_the_guest(tmp_path: Path) -> None:
    """The destination stops (SIGSTOP) during pre-copy: the guest keeps counting on the source, and after the stall
    limit the source gives up, never having paused it."""
    src = VmmHandle(tmp_path, "src", [*RETPOLINE_GUEST[:-2], "--memory", "64M", "--fill-memory", "random",
                                      "--stall", "4"])
    dst = VmmHandle(tmp_path, "dst", ["--incoming", f"unix:{tmp_path / 'dst.mig'}", "--host-cpu", "sapphirerapids"])
    try:
        src.wait_counts(3)
        stopped: list[int] = []

        def on_event(doc: dict[str, object]) -> None:
            if str(doc.get("event", "")).startswith("pre-copy round 1") and not stopped:
                os.kill(dst.proc.pid, signal.SIGSTOP)
                stopped.append(len(src.counts()))

        result = src.migrate(f"unix:{tmp_path / 'dst.mig'}", on_event=on_event)
        assert stopped, "the migration never reached pre-copy"
        counted_while_stopped = len(src.counts()) - stopped[0]
        assert counted_while_stopped >= 2, counted_while_stopped  # the guest ran while the peer was stopped
        assert not result["migrated"] and result["paused_at"] is None and "stalled" in result["reason"], result
        os.kill(dst.proc.pid, signal.SIGCONT)
        src.wait_counts(2)
        assert src.status()["state"] == "running"
        assert_continuous(src.counts())
        wait_state(dst, "waiting")
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
        src.stop()
        dst.stop()


def test_back_and_forth_migrations_keep_every_count(tmp_path: Path) -> None:
    """Several migrations between two VMMs that each take guests in: every heartbeat line in either log is whole
    (the source never prints the line the guest was writing when it paused: that line travels), and the counts,
    read across both logs in order, go up one heartbeat at a time."""
    a = VmmHandle(tmp_path, "a", [*RETPOLINE_GUEST, "--incoming", f"unix:{tmp_path / 'a.mig'}"])
    b = VmmHandle(tmp_path, "b", ["--incoming", f"unix:{tmp_path / 'b.mig'}", "--host-cpu", "sapphirerapids"])
    try:
        a.wait_counts(2)
        here, there, there_mig = a, b, "b.mig"
        for _ in range(6):
            result = here.migrate(f"unix:{tmp_path / there_mig}", fault="pause-mid-line")
            assert result["migrated"], result
            there.wait_counts(1)
            here, there = there, here
            there_mig = "a.mig" if there is a else "b.mig"
        for h in (a, b):
            lines = [ln for ln in h.lines() if ln.startswith("guest: count ")]
            assert all(COUNT.match(ln) for ln in lines), [ln for ln in lines if not COUNT.match(ln)]
        counts = sorted(a.counts() + b.counts())
        assert_continuous(counts)
        assert len(set(counts)) == len(counts)
    finally:
        a.stop()
        b.stop()
