"""The files the agent needs in a guest, and installing them with the systemd unit into a root directory (a
guest's /, or a mounted image).

A guest needs python3 and these files only: pvmit/__init__.py, pvmit/agent/*.py and *.json (the CPU history
table), pvmit/linux/__init__.py,
pvmit/linux/spectre_v2.py, and the standard-library-only modules every reader of pvmit shares: pvmit/errors.py,
pvmit/userfiles.py (reading files and devices safely) and pvmit/safetext.py (escaping text for a terminal).
The unit sets PYTHONPATH to LIB_DIR, so a copied bundle works without pip.
"""

from __future__ import annotations

from pathlib import Path

import pvmit
from pvmit.userfiles import staged

UNIT_NAME = "pvmit-guest-agent.service"
LIB_DIR = Path("usr/local/lib/pvmit-agent")
UNIT_DIR = Path("etc/systemd/system")


def agent_files() -> dict[str, bytes]:
    """Path inside the bundle (e.g. 'pvmit/agent/run.py') -> contents."""
    pkg = Path(pvmit.__file__).parent
    names = ["__init__.py", "errors.py", "userfiles.py", "safetext.py", "linux/__init__.py", "linux/spectre_v2.py"]
    names += sorted(f"agent/{p.name}" for p in (pkg / "agent").glob("*.py"))
    names += sorted(f"agent/{p.name}" for p in (pkg / "agent").glob("*.json"))  # cpu_history.json
    return {f"pvmit/{n}": (pkg / n).read_bytes() for n in names}


def unit_text() -> str:
    return (Path(__file__).parent / UNIT_NAME).read_text(encoding="utf-8")


def install(root: Path) -> list[Path]:
    """Write the bundle under root/LIB_DIR and the unit under root/UNIT_DIR; the paths written."""
    written = []
    files = {root / LIB_DIR / rel: data for rel, data in agent_files().items()}
    files[root / UNIT_DIR / UNIT_NAME] = unit_text().encode()
    with staged() as s:  # every file in place, or (after an error) none and no directory made for them
        for dest, data in files.items():
            s.directory(dest.parent)
            s.path(dest).write_bytes(data)
            written.append(dest)
    return written
