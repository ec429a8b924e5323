"""The kernel's own view of CPU vulnerabilities: /sys/devices/system/cpu/vulnerabilities/*."""

from __future__ import annotations

from pathlib import Path

VULN_DIR = Path("/sys/devices/system/cpu/vulnerabilities")


def read_vulnerabilities(root: Path = VULN_DIR) -> dict[str, str]:
    """Each file name and its one-line content, sorted by name. Raises OSError if the directory is unreadable."""
    return {p.name: p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(root.iterdir())
            if p.is_file()}
