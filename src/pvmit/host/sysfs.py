"""The kernel's own view of CPU vulnerabilities: /sys/devices/system/cpu/vulnerabilities/*."""

from __future__ import annotations

from pathlib import Path

from pvmit.userfiles import KiB, read_bytes

VULN_DIR = Path("/sys/devices/system/cpu/vulnerabilities")
SYSFS_CAP = 64 * KiB
"""Most read of one sysfs file (an attribute is at most one page)."""


def read_vulnerabilities(root: Path = VULN_DIR) -> dict[str, str]:
    """Each file name and its one-line content, sorted by name. Raises OSError if the directory is unreadable,
    FileError (naming it) if a file cannot be read or is not a regular file of at most SYSFS_CAP bytes."""
    return {p.name: read_bytes(p, "vulnerability file", SYSFS_CAP).decode("utf-8", "replace").strip()
            for p in sorted(root.iterdir()) if not p.is_dir()}
