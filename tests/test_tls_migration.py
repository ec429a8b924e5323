"""Migration between machines: mutual TLS on every TCP endpoint, credentials in QEMU's tls-creds-x509 layout.

The main test migrates a running guest between two network namespaces joined by a veth pair (two "machines" on
this one; addresses exist only inside those namespaces), where the test may create namespaces (root with `ip`);
elsewhere it runs over loopback TCP with TLS and says so. Then every way a peer's certificate can be wrong is tried:
each is refused before any VM data moves, and the source keeps its guest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvmit.kvm.system import kvm_available
from pvmit.net.tls import make_test_ca
from pvmit.node.cluster import VmmHandle
from pvmit.node.process import DEFAULT_HEARTBEAT

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
GUEST = ["--guest-cpu", "icelake-server-v2", "--host-cpu", "icelake-sp", "--pool", "sapphirerapids", "--memory",
         "16M"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pvmit(*args: str, prefix: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "pvmit", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def continuous(before: list[int], after: list[int]) -> None:
    assert after and before and after[0] == before[-1] + DEFAULT_HEARTBEAT, (before[-3:], after[:3])
    assert all(b - a == DEFAULT_HEARTBEAT for a, b in zip(after, after[1:]))


@dataclass
class Hosts:
    """Two hosts: a network namespace each (joined by a veth pair), or both on loopback."""

    how: str
    src_ip: str
    dst_ip: str
    src_prefix: list[str]
    dst_prefix: list[str]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    tag = secrets.token_hex(3)
    a, b = f"pvmit-a-{tag}", f"pvmit-b-{tag}"
    why = ""
    if os.geteuid() != 0:
        why = "not root"
    elif shutil.which("ip") is None:
        why = "no `ip` command (iproute2)"
    made: list[str] = []
    if not why:
        try:
            for ns in (a, b):
                _ip("netns", "add", ns)
                made.append(ns)
            _ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
            for ns, dev, addr in ((a, f"va{tag}", "10.203.0.1/24"), (b, f"vb{tag}", "10.203.0.2/24")):
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, OSError) as e:
            why = f"cannot create network namespaces: {getattr(e, 'stderr', b'') or e}"
    try:
        if why:
            warnings.warn(f"migration between machines ran over loopback TCP with TLS, not between network "
                          f"namespaces: {why}", stacklevel=1)
            yield Hosts("loopback", "127.0.0.1", "127.0.0.1", [], [])
        else:
            yield Hosts("network namespaces joined by a veth pair", "10.203.0.1", "10.203.0.2",
                        ["ip", "netns", "exec", a], ["ip", "netns", "exec", b])
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_migration_between_two_hosts_over_mutual_tls(tmp_path: Path, hosts: Hosts) -> None:
    creds = tmp_path / "pki"
    r = pvmit("tls", "make-test-ca", str(creds), hosts.dst_ip, hosts.src_ip, "localhost")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in creds.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem",
                                                      "server-cert.pem", "server-key.pem"]
    assert oct(os.stat(creds / "server-key.pem").st_mode & 0o777) == "0o600"
    assert pvmit("tls", "check", str(creds)).returncode == 0
    in_port, ctl_port = free_port(), free_port()
    dst_control = f"tcp:{hosts.dst_ip}:{ctl_port}"
    dst = VmmHandle(tmp_path, "dst", ["--incoming", f"tcp:{hosts.dst_ip}:{in_port}", "--host-cpu", "sapphirerapids"],
                    control=dst_control, creds=creds, prefix=hosts.dst_prefix)
    src = VmmHandle(tmp_path, "src", GUEST, creds=creds, prefix=hosts.src_prefix)
    try:
        assert "mutual TLS" in dst.text() and f"tcp:{hosts.dst_ip}:{in_port}" in dst.text()
        src.wait_counts(3)
        print(f"migrating over {hosts.how}: {hosts.src_ip} -> {hosts.dst_ip}")
        r = pvmit("migrate", "--from", src.control, "--to", f"tcp:{hosts.dst_ip}:{in_port}", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["migrated"] and doc["ready"]["forced"] == ["RRSBA_DIS_S"]
        dst_status = pvmit("ctl", dst_control, "status", "--tls-creds", str(creds), prefix=hosts.src_prefix)
        assert dst_status.returncode == 0, dst_status.stderr  # the control socket over TCP: the same certificates
        assert json.loads(dst_status.stdout)["state"] == "running"
        dst.wait_counts(3)
        continuous(src.counts(), dst.counts())
        assert "certificate CN=pvmit client" in dst.text()
        no_creds = pvmit("ctl", dst_control, "status", prefix=hosts.src_prefix)
        assert no_creds.returncode == 2 and "--tls-creds" in no_creds.stderr
    finally:
        src.stop()
        dst.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A good set, a set from another CA, an expired set, and a set whose server certificate names another host."""
    sets = {"good": (["127.0.0.1"], {}), "other-ca": (["127.0.0.1"], {}), "wrong-host": (["192.0.2.99"], {}),
            "expired-ca": (["127.0.0.1"], {"days": -1, "not_before_days": -30}),
            "expired-server": (["127.0.0.1"], {"expired": ("server",)}),
            "expired-client": (["127.0.0.1"], {"expired": ("client",)})}
    out = {}
    for name, (host_names, extra) in sets.items():
        make_test_ca(tmp_path / name, host_names, **extra)  # type: ignore[arg-type]
        out[name] = tmp_path / name
    mixed = tmp_path / "good-ca-other-client"  # trusts our CA, but presents a client certificate from another
    mixed.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(out["good"] / f, mixed / f)
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(out["other-ca"] / f, mixed / f)
    out["wrong-client"] = mixed
    return out


@pytest.mark.parametrize("dest_set,source_set,expected", [
    ("other-ca", "good", "certificate is not trusted"),  # the destination is not who we trust
    ("wrong-host", "good", "certificate is not trusted"),  # ... or not for the address we dialled
    ("expired-ca", "good", "certificate is not trusted"),
    ("expired-server", "expired-server", "certificate has expired"),
    ("good", "wrong-client", "refused our certificate"),  # we are not who the destination trusts
    ("expired-client", "expired-client", "refused our certificate"),
])
def test_a_wrong_certificate_is_refused_before_any_vm_data_moves(tmp_path: Path, pki: dict[str, Path],
                                                                 dest_set: str, source_set: str,
                                                                 expected: str) -> None:
    port = free_port()
    dst = VmmHandle(tmp_path, "dst", ["--incoming", f"tcp:127.0.0.1:{port}", "--host-cpu", "sapphirerapids"],
                    creds=pki[dest_set])
    src = VmmHandle(tmp_path, "src", GUEST, creds=pki[source_set])
    try:
        src.wait_counts(2)
        result = src.migrate(f"tcp:127.0.0.1:{port}")
        assert not result["migrated"] and result["paused_at"] is None and result["bytes_sent"] == 0, result
        assert expected in result["reason"], result["reason"]
        n = len(src.counts())
        src.wait_counts(2)
        assert src.status()["state"] == "running" and dst.status()["state"] == "waiting"
        counts = src.counts()
        assert all(b - a == DEFAULT_HEARTBEAT for a, b in zip(counts[n - 1:], counts[n:]))
        assert "incoming guest" not in dst.text()  # nothing of the VM reached the destination
    finally:
        src.stop()
        dst.stop()


def test_plain_tcp_is_refused_with_the_way_to_give_credentials(tmp_path: Path, pki: dict[str, Path]) -> None:
    r = pvmit("vmm", "--control", f"tcp:127.0.0.1:{free_port()}", *GUEST)
    assert r.returncode == 2 and "--tls-creds DIR" in r.stderr and "ca-cert.pem" in r.stderr, r.stderr
    r = pvmit("migrate", "--from", "tcp:192.0.2.1:4444", "--to", "unix:/nonexistent")
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "make-test-ca" in r.stderr, r.stderr
    src = VmmHandle(tmp_path, "src", GUEST)  # no credentials: a TCP destination is refused, the guest stays
    try:
        src.wait_counts(2)
        answer = src.request({"cmd": "migrate", "to": "tcp:192.0.2.1:4444"}, timeout=30)
        assert answer["ok"] is False and "mutual TLS" in answer["error"]
        assert src.status()["state"] == "running"
    finally:
        src.stop()


def test_a_plain_client_on_a_tls_port_gets_nothing(tmp_path: Path, pki: dict[str, Path]) -> None:
    port = free_port()
    vmm = VmmHandle(tmp_path, "vmm", GUEST, control=f"tcp:127.0.0.1:{port}", creds=pki["good"])
    try:
        vmm.wait_counts(2)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b'{"cmd": "quit", "force": true}\n')
            try:
                data = s.recv(100)
            except OSError:
                data = b""
        assert b"ok" not in data
        assert vmm.status()["state"] == "running"
        vmm.wait_counts(2)
        assert "TLS handshake failed" in vmm.text()
    finally:
        vmm.stop()
