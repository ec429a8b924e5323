"""A small Linux guest for libvirt tests: Debian's kernel (direct kernel boot) and an initramfs with busybox and
QEMU's own guest agent (qemu-ga, Debian's qemu-guest-agent) on the virtio-serial port libvirt gives it.

/init prints the kernel's spectre_v2 line on the serial console (so a test can compare it with what pvmit reads
through the agent), loads the virtio modules the kernel has as modules, starts qemu-ga on the port named
org.qemu.guest_agent.0, and waits.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from pvmit.oracle.cpio import Entry, gzipped
from pvmit.oracle.initramfs import Kernel, find_busybox, module_bytes, shared_libraries

QEMU_GA = Path("/usr/sbin/qemu-ga")
MODULES = ("virtio_pci", "virtio_console")
SPECTRE_MARK = "@@spectre_v2 "
READY_MARK = "@@qemu-ga started"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run
for m in $(cat /modules.order); do insmod /lib/modules/$m; done
echo "{SPECTRE_MARK}$(cat /sys/devices/system/cpu/vulnerabilities/spectre_v2)"
port=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${{p##*/}}
done
echo "@@agent port $port"
/usr/sbin/qemu-ga -m virtio-serial -p $port -t /run -f /run/qemu-ga.pid -d && echo "{READY_MARK}"
while true; do sleep 3600; done
"""


def unavailable(kernel: Kernel | None) -> str | None:
    if kernel is None:
        return "no kernel in /boot (Debian: linux-image-amd64)"
    if not QEMU_GA.exists():
        return f"{QEMU_GA} is missing (Debian: qemu-guest-agent)"
    try:
        find_busybox()
    except Exception as e:  # noqa: BLE001 - the message says what to install
        return str(e)
    return None


def _modules(kernel: Kernel) -> list[tuple[str, Path]]:
    """The modules (and what they depend on) of MODULES that the kernel has as modules, in load order."""
    dep = kernel.modules / "modules.dep"
    table: dict[str, tuple[str, list[str]]] = {}
    for line in dep.read_text().splitlines():
        path, _, deps = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        table[name] = (path, deps.split())
    order: list[tuple[str, Path]] = []

    def visit(path: str) -> None:
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        for d in table.get(name, (path, []))[1]:
            visit(d)
        if all(n != name for n, _ in order):
            order.append((name, kernel.modules / path))

    for m in MODULES:
        if m in table:
            visit(table[m][0])
    return order


def build(kernel: Kernel) -> bytes:
    """The gzipped newc initramfs."""
    files: dict[str, tuple[bytes, int]] = {}

    def add(src: Path, dest: str, mode: int = 0o755) -> None:
        files[dest.lstrip("/")] = (src.read_bytes(), mode)

    busybox = find_busybox()
    add(busybox, "bin/busybox")
    add(QEMU_GA, str(QEMU_GA))
    for lib in {lib for b in (busybox, QEMU_GA) for lib in shared_libraries(b)}:
        add(Path(os.path.realpath(lib)), str(lib))
    order = []
    for name, path in _modules(kernel):
        files[f"lib/modules/{name}.ko"] = (module_bytes(path), 0o644)  # plain, whatever the kernel's compression
        order.append(f"{name}.ko")
    files["modules.order"] = ("\n".join(order).encode() + b"\n", 0o644)
    files["init"] = (INIT.encode(), 0o755)
    dirs = {"proc", "sys", "dev", "bin", "run", "tmp", "lib/modules"}
    for p in files:
        parts = p.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    entries += [Entry(p, stat.S_IFREG | mode, data) for p, (data, mode) in sorted(files.items())]
    return gzipped(entries)


def copy_kernel(kernel: Kernel, dest: Path) -> Path:
    """The kernel image copied where every test host can read it."""
    shutil.copyfile(kernel.image, dest)
    return dest
