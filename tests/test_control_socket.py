"""The control socket against careless and hostile local clients: a real `pvmit vmm` process on /dev/kvm, attacked
through its socket while its guest counts. Whatever a client does, the VMM keeps serving and its guest keeps
counting; only an allowed `quit` ends it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pvmit.kvm.system import kvm_available
from pvmit.net.peer import ACK, NAK
from pvmit.node.cluster import VmmHandle
from pvmit.node.listener import REFUSERS
from pvmit.node.process import DEFAULT_HEARTBEAT

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
GUEST = ["--guest-cpu", "icelake-server-v2", "--host-cpu", "icelake-sp", "--memory", "8M"]


@pytest.fixture
def vmm(tmp_path: Path):  # type: ignore[no-untyped-def]
    h = VmmHandle(tmp_path, "vmm", GUEST)
    try:
        h.wait_counts(2)
        yield h
    finally:
        h.stop()


def raw(h: VmmHandle) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(h.control.removeprefix("unix:"))
    return s


def still_alive(h: VmmHandle) -> None:
    """The VMM answers, its guest is still counting, and counts continue one heartbeat apart."""
    assert h.proc.poll() is None, h.text()[-2000:]
    before = len(h.counts())
    h.wait_counts(2, timeout=30)
    assert h.status()["state"] == "running"
    counts = h.counts()
    assert all(b - a == DEFAULT_HEARTBEAT for a, b in zip(counts[before - 1:], counts[before:]))
    assert "Traceback" not in h.text()


def test_connect_then_close_does_not_end_the_vmm(vmm: VmmHandle) -> None:
    for _ in range(20):
        raw(vmm).close()
    s = raw(vmm)  # a command sent, then gone before the answer is written
    assert s.recv(1) == ACK
    s.sendall(b'{"cmd": "status"}\n')
    s.close()
    still_alive(vmm)


def test_a_client_interrupted_while_waiting_does_not_end_the_vmm(vmm: VmmHandle, tmp_path: Path) -> None:
    """`pvmit ctl` killed (or timing out) while the VMM is busy with its command: the reply goes nowhere."""
    p = subprocess.Popen([sys.executable, "-m", "pvmit", "migrate", "--from", vmm.control, "--to",
                          f"unix:{tmp_path / 'nobody.mig'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    p.wait(30)
    r = subprocess.run([sys.executable, "-m", "pvmit", "ctl", vmm.control, "status", "--timeout", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr
    still_alive(vmm)


@pytest.mark.parametrize("junk", [b"\x00\xff\xfe garbage\n", b"[1, 2]\n", b'{"cmd": 5}\n', b'{"cmd": "nope"}\n',
                                  b"1" * 5000 + b"\n", b'{"cmd": NaN}\n', b"[" * 100000 + b"\n",
                                  b'{"cmd": "migrate", "to": "tcp:10.0.0.1:1"}\n',
                                  b'{"cmd": "migrate", "to": "unix:/x", "check": "yes"}\n',
                                  b'{"cmd": "outcome", "migration": 7}\n', b'{"cmd": "resolve", "action": "run"}\n',
                                  b'{"cmd": "migrate", "to": "\\ud800"}\n'])
def test_junk_is_answered_and_the_vmm_goes_on(vmm: VmmHandle, junk: bytes) -> None:
    with raw(vmm) as s:
        assert s.recv(1) == ACK
        s.sendall(junk)
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is False and answer["error"], answer
    assert len(answer["error"]) < 1000  # an over-long input is not echoed in full
    still_alive(vmm)


def test_a_huge_line_is_refused_without_growing_memory(vmm: VmmHandle) -> None:
    with raw(vmm) as s:
        assert s.recv(1) == ACK
        try:
            for _ in range(64):
                s.sendall(b"x" * 65536)  # 4 MiB without a newline
        except OSError:
            pass  # the VMM stopped reading at 64 KiB and hung up: what it should do
        data = s.recv(4096)
    assert b"at most 65536 bytes" in data or data == b""
    still_alive(vmm)


def test_a_half_open_client_is_dropped_at_the_deadline_and_stalls_nothing(vmm: VmmHandle) -> None:
    s = raw(vmm)
    assert s.recv(1) == ACK
    s.sendall(b'{"cmd": "sta')  # and never the rest
    t0 = time.monotonic()
    assert vmm.status()["state"] == "running" and time.monotonic() - t0 < 5  # others are served meanwhile
    s.settimeout(30)
    answer = s.makefile("rb").readline()  # the VMM gives up on it after its overall deadline
    assert b"no command read" in answer, answer
    s.close()
    still_alive(vmm)


def test_many_clients_at_once_are_bounded_and_told(vmm: VmmHandle) -> None:
    """More silent clients than the limit: the surplus is refused with a message (or closed once the refusers are
    busy too), the VMM's threads stay bounded, and a well-behaved client is served once the silent ones go."""
    silent = []
    for _ in range(16):
        s = raw(vmm)
        assert s.recv(1) == ACK
        silent.append(s)
    refused = []
    for _ in range(REFUSERS + 4):
        s = raw(vmm)
        refused.append(s.recv(200))
        s.close()
    assert any(r.startswith(NAK) and b"too many connections" in r for r in refused), refused
    threads = int(Path(f"/proc/{vmm.proc.pid}/status").read_text().split("Threads:")[1].split()[0])
    assert threads < 40, threads
    for s in silent:
        s.close()
    time.sleep(0.5)
    still_alive(vmm)


def test_many_concurrent_status_clients_are_all_answered(vmm: VmmHandle) -> None:
    answers: list[str] = []

    def ask() -> None:
        for _ in range(5):
            try:
                answers.append(vmm.status()["state"])
            except Exception as e:  # noqa: BLE001
                answers.append(repr(e))

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers.count("running") >= 40, answers  # a few may be told "too many connections" and retry later
    still_alive(vmm)


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a python3 in /usr/bin that another user can run")
def test_another_user_is_refused_by_peer_credentials() -> None:
    """Even with the socket file opened up (mode 0666), a client of another uid is refused by SO_PEERCRED."""
    work = Path(tempfile.mkdtemp(prefix="pvmit-peercred-", dir="/tmp"))
    os.chmod(work, 0o711)  # others may reach the socket by its path, as they could if an operator erred
    h = VmmHandle(work, "vmm", GUEST)
    try:
        h.wait_counts(2)
        path = h.control.removeprefix("unix:")
        os.chmod(path, 0o666)
        command = b'{"cmd": "quit", "force": true}\n'
        code = (f"import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({path!r})\n"
                f"try:\n    s.sendall({command!r})\nexcept OSError:\n    pass\nprint(s.recv(300))")
        r = subprocess.run([str(SYSTEM_PYTHON), "-c", code], capture_output=True, text=True, timeout=30, user=65534,
                           group=65534, cwd="/")
        assert "permission denied" in r.stdout and "uid 65534" in r.stdout, r.stdout + r.stderr
        still_alive(h)
        assert "refused uid 65534" in h.text()
    finally:
        h.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_the_socket_file_is_private(vmm: VmmHandle) -> None:
    mode = os.stat(vmm.control.removeprefix("unix:")).st_mode & 0o777
    assert mode == 0o600


def test_quit_is_refused_during_a_migration_unless_forced(tmp_path: Path) -> None:
    """A migration in flight is not cut short by a quit: the guest would be lost while it is paused."""
    src = VmmHandle(tmp_path, "src", GUEST)
    try:
        src.wait_counts(2)
        hold = socket.socket(socket.AF_UNIX)  # a destination that accepts and then says nothing
        hold.bind(str(tmp_path / "silent.mig"))
        hold.listen(1)
        result: dict[str, object] = {}
        t = threading.Thread(target=lambda: result.update(src.migrate(f"unix:{tmp_path / 'silent.mig'}")))
        t.start()
        conn, _ = hold.accept()
        conn.sendall(ACK)
        time.sleep(0.5)
        assert src.status()["state"] == "migrating"
        answer = src.request({"cmd": "quit"}, timeout=30)
        assert answer["ok"] is False and "migration is in flight" in answer["error"]
        conn.close()  # the destination goes away: the migration fails, the guest stays
        t.join(60)
        assert result["migrated"] is False and result["paused_at"] is None
        still_alive(src)
        hold.close()
    finally:
        src.stop()


def test_the_vmm_says_what_it_listens_on_and_how(vmm: VmmHandle) -> None:
    assert f"vmm: control socket {vmm.control} (Unix socket mode 0600, peers checked by SO_PEERCRED" in vmm.text()


def test_socket_paths_are_removed_on_errors(tmp_path: Path) -> None:
    for bad in (["--guest-cpu", "no-such-cpu"], ["--guest-cpu", "icelake-server-v2", "--memory", "3M"],
                ["--guest-cpu", "icelake-server-v2", "--heartbeat", "0"]):
        r = subprocess.run([sys.executable, "-m", "pvmit", "vmm", "--control", f"unix:{tmp_path / 'c.ctl'}",
                            "--incoming", f"unix:{tmp_path / 'i.mig'}", *bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())
