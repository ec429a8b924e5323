"""Real libvirt for the tests: libvirt daemons that look like separate hosts, on this one machine.

Each "host" is a libvirtd with its own virtlogd, started without systemd (`virtlogd -d`, `libvirtd -d`) in its own
network namespace (a veth pair joins the two, and QEMU's migration stream crosses it), its own UTS namespace (its
own hostname) and its own mount namespace, in which per-host directories are bound over /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt. Its host UUID is its own (libvirtd.conf host_uuid), so
libvirt sees two machines and migrates between them. Clients reach each daemon through its socket file.

pvmit's hook is installed in each host's /etc/libvirt before its daemon starts (libvirt looks for hooks when it
starts), with that host's own settings (which CPU it is, for pvmit). Guests run under TCG (type 'qemu').

Everything started is stopped by process id (domains destroyed through libvirt, then any QEMU left by its pid file,
libvirtd and virtlogd by theirs); the namespaces are removed; mount points this module had to create are removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("libvirtd", "virtlogd", "virsh", "ip", "unshare", "qemu-system-x86_64")
BOUND = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
HOOK_CONFIG = "/etc/libvirt/pvmit-hook.toml"  # inside each host's own /etc/libvirt
START_TIMEOUT = 60.0


def unavailable() -> str | None:
    """Why real libvirt cannot run here (None when it can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (libvirtd runs as root; the hosts are namespaces)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"not installed: {', '.join(missing)} (Debian: libvirt-daemon libvirt-daemon-driver-qemu "
                "libvirt-clients qemu-system-x86 iproute2)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt binding is not installed (pip install '.[libvirt]', which needs libvirt-dev)"
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return ("libvirtd needs the user libvirt-qemu (Debian's libvirt-daemon-system creates it; or "
                "useradd --system --user-group libvirt-qemu)")
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def run(*args: str, check: bool = True, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p  # type: ignore[no-any-return]


def pvmit(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "pvmit", *args, check=check, timeout=timeout,
               env={**os.environ, "COLUMNS": "200"})


@dataclass
class Host:
    name: str
    dir: Path
    netns: str
    ip: str
    host_cpu: str
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.dir}/run/libvirt-sock"

    @property
    def hook_log(self) -> Path:
        return self.dir / "hook.log"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    def virsh(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run("virsh", "-c", self.uri, *args, check=check, timeout=timeout)

    def running(self) -> list[str]:
        out = self.virsh("list", "--name", check=False).stdout
        return [n for n in out.split() if n]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return


class Lab:
    """Two or more libvirt hosts joined by a network; `start()` and `stop()`."""

    def __init__(self, base: Path, hosts: list[tuple[str, str]]) -> None:
        tag = f"pv{os.getpid() % 100000}"
        self.hosts = [Host(name, base / name, f"{tag}{name}", f"10.251.{os.getpid() % 200}.{i + 1}", cpu)
                      for i, (name, cpu) in enumerate(hosts)]
        self.bridge_ns = f"{tag}br"
        self.created_dirs: list[Path] = []

    def _net(self) -> None:
        run("ip", "netns", "add", self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            run("ip", "netns", "add", h.netns)
            run("ip", "link", "add", f"{h.netns[:10]}h", "type", "veth", "peer", "name", f"{h.netns[:10]}b")
            run("ip", "link", "set", f"{h.netns[:10]}h", "netns", h.netns, "name", "eth0")
            run("ip", "link", "set", f"{h.netns[:10]}b", "netns", self.bridge_ns, "name", f"p{i}")
            run("ip", "-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            run("ip", "-n", h.netns, "link", "set", "eth0", "up")
            run("ip", "-n", h.netns, "link", "set", "lo", "up")

    def _configure(self, h: Host) -> None:
        etc = h.root / "etc" / "libvirt"
        for d in (etc, h.dir / "run", h.dir / "lib", h.dir / "cache", h.dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        (etc / "libvirtd.conf").write_text(
            f'auth_unix_rw = "none"\nhost_uuid = "{uuid.uuid4()}"\n'
            f'log_outputs = "3:file:{h.dir}/libvirtd.log"\n', encoding="utf-8")
        # QEMU runs as root with no security driver or cgroups: there is no systemd and no SELinux/AppArmor here
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n'
            'namespaces = [ ]\ncgroup_controllers = [ ]\n', encoding="utf-8")
        pvmit("libvirt", "hook", "install", "--root", str(h.root), "--config", HOOK_CONFIG, "--host-cpu",
              h.host_cpu, "--log", str(h.hook_log), "--force")

    def _start(self, h: Host) -> None:
        binds = " && ".join(f"mount --bind {src} {dst}" for src, dst in (
            (h.root / "etc" / "libvirt", "/etc/libvirt"), (h.dir / "run", "/run/libvirt"),
            (h.dir / "lib", "/var/lib/libvirt"), (h.dir / "cache", "/var/cache/libvirt"),
            (h.dir / "log", "/var/log/libvirt")))
        script = (f"set -e; {binds}; hostname {h.name}; "
                  f"{_which('virtlogd')} -d -p {h.dir}/virtlogd.pid; {_which('libvirtd')} -d -p {h.dir}/libvirtd.pid")
        run("ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", script)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for d in ("virtlogd", "libvirtd"):
                pidfile = h.dir / f"{d}.pid"
                if d not in h.pids and pidfile.exists() and pidfile.read_text().strip().isdigit():
                    h.pids[d] = int(pidfile.read_text())
            if len(h.pids) == 2 and h.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        log = (h.dir / "libvirtd.log").read_text(errors="replace")[-2000:] if (h.dir / "libvirtd.log").exists() \
            else ""
        raise RuntimeError(f"libvirtd of {h.name} did not answer within {START_TIMEOUT:.0f} s:\n{log}")

    def start(self) -> Lab:
        for d in BOUND:
            if not Path(d).exists():
                Path(d).mkdir(parents=True)
                self.created_dirs.append(Path(d))
        try:
            self._net()
            for h in self.hosts:
                self._configure(h)
                self._start(h)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for h in self.hosts:
            if "libvirtd" in h.pids:
                for name in h.running():
                    h.virsh("destroy", name, check=False)
            for pidfile in (h.dir / "run" / "qemu").glob("*.pid"):  # anything libvirt could not stop
                text = pidfile.read_text().strip()
                if text.isdigit():
                    stop_pid(int(text))
            for d in ("libvirtd", "virtlogd"):
                if d in h.pids:
                    stop_pid(h.pids.pop(d))
        for ns in [h.netns for h in self.hosts] + [self.bridge_ns]:
            run("ip", "netns", "del", ns, check=False)
        for d in reversed(self.created_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        self.created_dirs.clear()


def domain_xml(name: str, model: str | None, *, memory_mib: int = 64, kernel: Path | None = None,
               initrd: Path | None = None, cmdline: str = "", agent: bool = False, serial: Path | None = None,
               mode: str = "custom", features: tuple[tuple[str, str], ...] = ()) -> str:
    """A TCG domain: a named CPU model (or `mode`), direct kernel boot when `kernel` is given (otherwise the
    firmware finds nothing to boot and waits), a guest agent channel when `agent`."""
    boot = ""
    if kernel is not None:
        boot = f"<kernel>{kernel}</kernel>" + (f"<initrd>{initrd}</initrd>" if initrd else "") + \
               f"<cmdline>{cmdline}</cmdline>"
    feats = "".join(f"<feature policy='{p}' name='{n}'/>" for p, n in features)
    cpu = f"<cpu mode='{mode}'>" + (f"<model fallback='forbid'>{model}</model>" if model else "") + feats + "</cpu>"
    devices = "<emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/>"
    if agent:
        devices += "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    devices += f"<serial type='file'><source path='{serial}'/></serial>" if serial else "<serial type='null'/>"
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>{cpu}"
            f"<on_poweroff>destroy</on_poweroff><devices>{devices}</devices></domain>")


def define_and_start(h: Host, xml: str, tmp: Path) -> None:
    name = xml.split("<name>")[1].split("</name>")[0]
    path = tmp / f"{h.name}-{name}.xml"
    path.write_text(xml, encoding="utf-8")
    h.virsh("define", str(path))
    h.virsh("start", name)


def cpu_elements(text: str) -> list[str]:
    """Every <cpu> element in `text` (a command's output may hold several, one per pool)."""
    import re

    return re.findall(r"<cpu\b[^>]*/>|<cpu\b.*?</cpu>", text, re.DOTALL)


def rejects_cpu(h: Host, cpu: str, tmp: Path, name: str) -> str | None:
    """Why this libvirt does not accept the guest CPU definition `cpu` (None when it does): it must compare
    against the hypervisor's CPU (`virsh hypervisor-cpu-compare`: identical, superset or incompatible are all
    answers; an unknown model or feature name, or bad XML, is an error), and a domain with it must define."""
    path = tmp / f"{name}-cpu.xml"
    path.write_text(cpu, encoding="utf-8")
    cmp = h.virsh("hypervisor-cpu-compare", str(path), "--virttype", "qemu", check=False)
    if "error:" in cmp.stderr or not any(w in cmp.stdout for w in ("identical", "superset", "incompatible")):
        return f"hypervisor-cpu-compare: {cmp.stderr.strip() or cmp.stdout.strip()}"
    xml = domain_xml(name, None).replace("<cpu mode='custom'></cpu>", cpu)
    dom = tmp / f"{name}.xml"
    dom.write_text(xml, encoding="utf-8")
    d = h.virsh("define", str(dom), check=False)
    if d.returncode:
        return f"define: {d.stderr.strip()}"
    h.virsh("undefine", name, check=False)
    return None
