"""The oracle's initramfs: busybox as /init's shell, the msr and cpuid modules of the kernel under test, Debian's
python3 with the shared libraries and the part of its standard library the agent loads, and the agent itself.

/init mounts proc, sysfs, devtmpfs and securityfs, loads the two modules, prints between markers what the kernel
says (release, version, command line, every /sys/devices/system/cpu/vulnerabilities file, the cpuinfo flags and
bugs lines), runs `python3 -m pvmit.agent report --dry-run --json`, and powers off.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pvmit.agent.bundle import agent_files
from pvmit.errors import PvmitError
from pvmit.oracle.cpio import Entry, gzipped
from pvmit.userfiles import FileError, MiB, open_checked, read_bytes

BEGIN, END = "@@PVMIT-ORACLE-BEGIN@@", "@@PVMIT-ORACLE-END@@"
AGENT_DIR = "agent"
INITRAMFS_FILE_CAP = 256 * MiB  # busybox, python3 and its libraries are a few MiB each

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
insmod /lib/modules/msr.ko
insmod /lib/modules/cpuid.ko
echo "{BEGIN}"
echo "@@release $(uname -r)"
echo "@@version $(cat /proc/version)"
echo "@@cmdline $(cat /proc/cmdline)"
for f in /sys/devices/system/cpu/vulnerabilities/*; do echo "@@vuln ${{f##*/}} $(cat $f)"; done
echo "@@flags $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
echo "@@bugs $(grep -m1 '^bugs' /proc/cpuinfo | cut -d: -f2)"
echo "@@lockdown $(cat /sys/kernel/security/lockdown 2>/dev/null)"
PYTHONPATH=/{AGENT_DIR} PYTHONDONTWRITEBYTECODE=1 {{python}} -S -m pvmit.agent report --dry-run --json \\
    >/agent.json 2>/agent.err
echo "@@agent-exit $?"
sed 's/^/@@agent-json /' /agent.json
sed 's/^/@@agent-err /' /agent.err
echo "{END}"
poweroff -f
"""


class OracleUnavailable(PvmitError):
    """Something the oracle needs on this machine is missing; the message says what to install."""


@dataclass(frozen=True)
class Kernel:
    image: Path
    release: str
    modules_root: Path = Path("/lib/modules")

    @property
    def modules(self) -> Path:
        return self.modules_root / self.release


def find_kernel(image: Path | None = None) -> Kernel:
    """The kernel to boot: `image`, or the newest /boot/vmlinuz-* (Debian's linux-image-amd64 installs there)."""
    if image is None:
        found = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: [int(x) if x.isdigit() else x
                                                                      for x in re.split(r"(\d+)", p.name)])
        if not found:
            raise OracleUnavailable("no kernel in /boot: install Debian's kernel (apt-get install linux-image-amd64) "
                                    "or name one with --kernel")
        image = found[-1]
    if not image.is_file():
        raise OracleUnavailable(f"{image}: no such kernel image")
    release = image.name.removeprefix("vmlinuz-")
    if not os.access(image, os.R_OK):
        raise OracleUnavailable(f"{image}: not readable (Debian's images are; run as root otherwise)")
    return Kernel(image, release)


def _is_elf(path: Path) -> bool:
    try:  # --python may name anything: a FIFO must not block here
        fd = open_checked(path, "executable")
    except FileError:
        return False
    try:
        return os.read(fd, 4) == b"\x7fELF"
    except OSError:
        return False
    finally:
        os.close(fd)


def find_python(path: Path | None = None) -> Path:
    """A real python3 executable (not a shim or a venv's link to one): Debian's python3-minimal by default."""
    candidate = Path(os.path.realpath(path or "/usr/bin/python3"))
    if not _is_elf(candidate):
        raise OracleUnavailable(f"{candidate}: not a python3 executable; install python3-minimal "
                                "(apt-get install python3-minimal) or name one with --python")
    return candidate


def find_busybox() -> Path:
    for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if _is_elf(p):
            return p
    raise OracleUnavailable("busybox not found: apt-get install busybox-static")


def shared_libraries(binary: Path) -> list[Path]:
    """What the dynamic loader needs for `binary` (from ldd), loader included; [] for a static binary."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise OracleUnavailable("ldd not found (Debian: libc-bin)")
    p = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=30)
    libs = []
    for line in p.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m[1]))
    return libs


_COLLECT = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
for argv in (["--help"], ["report", "--dry-run", "--json"], ["status"]):  # as `python3 -m pvmit.agent` does
    sys.argv = ["pvmit.agent", *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            runpy.run_module("pvmit.agent", run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
import encodings.utf_8, encodings.ascii, encodings.latin_1, encodings.aliases
print(json.dumps({"files": [getattr(m, "__file__", None) for m in list(sys.modules.values())],
                  "stdlib": [sys.prefix, sys.base_prefix], "version": "%d.%d" % sys.version_info[:2]}))
"""


def python_files(python: Path, bundle: Path) -> tuple[list[Path], str]:
    """The standard-library files (and extension modules) the agent loads under `python`: found by running the
    agent with that interpreter and listing its modules; and the interpreter's version."""
    p = subprocess.run([str(python), "-S", "-B", "-c", _COLLECT, str(bundle)], capture_output=True, text=True,
                       timeout=120)
    if p.returncode:
        raise OracleUnavailable(f"{python} cannot run the agent: {p.stderr.strip()[-400:]}")
    doc = json.loads(p.stdout)
    lib = Path(doc["stdlib"][0]) / "lib" / f"python{doc['version']}"
    files = {Path(f) for f in doc["files"] if f and Path(f).is_relative_to(lib) and Path(f).is_file()}
    files.add(lib / "os.py")  # getpath's landmark: how the interpreter finds its prefix
    return sorted(files), doc["version"]


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
"""How Debian's kernels ship a module: plain (6.1), xz (6.12: CONFIG_MODULE_COMPRESS_XZ), zstd or gzip (other
distributions' kernels). The initramfs gets the plain module, so busybox's insmod needs no decompressor."""


def _module(kernel: Kernel, name: str) -> Path:
    base = kernel.modules / "kernel" / "arch" / "x86" / "kernel" / name
    for suffix in MODULE_SUFFIXES:
        path = base.with_name(name + suffix)
        if path.is_file():
            return path
    raise OracleUnavailable(f"{base}.ko is missing (nor {', '.join(MODULE_SUFFIXES[1:])}): the {name} module of "
                            f"{kernel.release} is needed (Debian's linux-image package ships it)")


def _zstd_decompress(data: bytes, path: Path) -> bytes:
    """zstd: the standard library has it only from Python 3.14 (compression.zstd); before that the `zstd` program
    (Debian's zstd package) does it, so the oracle needs no PyPI package for a format Debian's kernels do not use."""
    if importlib.util.find_spec("compression") is not None:
        zstd = importlib.import_module("compression.zstd")
        try:
            return bytes(zstd.decompress(data))
        except Exception as e:  # compression.zstd.ZstdError
            raise OracleUnavailable(f"{path}: cannot decompress: {e}") from None
    exe = shutil.which("zstd")
    if exe is None:
        raise OracleUnavailable(f"{path}: a zstd-compressed module needs Python 3.14 or the zstd program "
                                "(apt-get install zstd)")
    p = subprocess.run([exe, "-d", "-c", "-q"], input=data, capture_output=True, timeout=60)
    if p.returncode:
        raise OracleUnavailable(f"{path}: zstd -d failed: {p.stderr.decode('utf-8', 'replace').strip()}")
    return p.stdout


def module_bytes(path: Path) -> bytes:
    """The plain ELF module from `path`, decompressed by its suffix; OracleUnavailable when that fails."""
    try:
        data = read_bytes(path, "kernel module", INITRAMFS_FILE_CAP)
    except FileError as e:
        raise OracleUnavailable(str(e)) from None
    try:
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".zst"):
            data = _zstd_decompress(data, path)
        elif path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise OracleUnavailable(f"{path}: cannot decompress: {e}") from None
    if not data.startswith(b"\x7fELF"):
        raise OracleUnavailable(f"{path}: not an ELF module once decompressed")
    return data


def build(kernel: Kernel, python: Path | None = None) -> bytes:
    """The gzipped newc initramfs for `kernel`."""
    python = find_python(python)
    busybox = find_busybox()
    files: dict[str, tuple[bytes, int, int]] = {}  # archive path -> data, mode, mtime

    def add_file(src: Path, dest: str | None = None, mode: int | None = None) -> None:
        st = src.stat()
        try:  # --python names one of them: a regular file of bounded size, like every file pvmit reads
            data = read_bytes(src, "file for the initramfs", INITRAMFS_FILE_CAP)
        except FileError as e:
            raise OracleUnavailable(str(e)) from None
        files[(dest or str(src)).lstrip("/")] = (data, mode or (st.st_mode & 0o777), int(st.st_mtime))

    add_file(busybox, "bin/busybox", 0o755)
    for name in ("msr", "cpuid"):
        files[f"lib/modules/{name}.ko"] = (module_bytes(_module(kernel, name)), 0o644, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in agent_files().items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
            files[f"{AGENT_DIR}/{rel}"] = (data, 0o644, 0)
        stdlib, version = python_files(python, Path(tmp))
    add_file(python, mode=0o755)
    for so in {lib for b in [python, busybox, *(f for f in stdlib if f.suffix == ".so")]
               for lib in shared_libraries(b)}:
        add_file(Path(os.path.realpath(so)), str(so), 0o755)
    for f in stdlib:
        add_file(f)
        pyc = f.parent / "__pycache__" / f"{f.stem}.cpython-{version.replace('.', '')}.pyc"
        if f.suffix == ".py" and pyc.is_file():
            add_file(pyc)
    init = INIT.replace("{python}", str(python))
    files["init"] = (init.encode(), 0o755, 0)
    dirs = {"proc", "sys", "dev", "bin", "lib/modules"}
    for path in files:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    entries += [Entry(p, stat.S_IFREG | mode, data, mtime) for p, (data, mode, mtime) in sorted(files.items())]
    return gzipped(entries)
