"""Write src/pvmit/agent/cpu_history.json from pvmit's catalog (tests/test_bhi.py says when it is stale)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pvmit.catalog.loader import load_catalog
from pvmit.interface.pooldesc import cpu_history

TABLE = Path(__file__).resolve().parent.parent / "src" / "pvmit" / "agent" / "cpu_history.json"


def render() -> str:
    return json.dumps(cpu_history(load_catalog([])), indent=1) + "\n"


if __name__ == "__main__":
    TABLE.write_text(render(), encoding="utf-8")
    print(f"wrote {TABLE}", file=sys.stderr)
