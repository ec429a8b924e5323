"""`pvmit bench migrate`: total migration time and guest downtime for guests of several sizes, and the share of
the downtime spent in pvmit's own interface checks (deciding) and in applying what they decided (MSR filter,
IA32_SPEC_CTRL). Real VMM processes, a real socket, guest memory filled with
data so that pre-copy has something to copy."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvmit.node.cluster import PAUSED, RESUMED, VmmHandle


def one(size: str, work: Path, catalogs: list[str]) -> dict[str, Any]:
    src = VmmHandle(work, "src", ["--guest-cpu", "icelake-server-v2", "--host-cpu", "icelake-sp", "--pool",
                                  "sapphirerapids", "--memory", size, "--fill-memory"], catalogs=catalogs)
    dst = VmmHandle(work, "dst", ["--incoming", f"unix:{work / 'dst.mig'}", "--host-cpu", "sapphirerapids"],
                    catalogs=catalogs)
    try:
        src.wait_counts(3, timeout=120)
        result = src.migrate(f"unix:{work / 'dst.mig'}")
        if not result["migrated"]:
            raise RuntimeError(f"benchmark migration failed: {result['reason']}")
        dst.wait_counts(1, timeout=60)
        paused, resumed = src.monotonic(PAUSED), dst.monotonic(RESUMED)
        assert paused is not None and resumed is not None
        downtime_ms = (resumed - paused) * 1e3
        check_ms = float(result["ready"]["interface_check_ms"])
        apply_ms = float(result["ready"]["apply_ms"])
        return {"size": size, "mode": result["mode"], "rounds": result["rounds"], "pages": result["pages_sent"],
                "mib_sent": round(result["bytes_sent"] / (1 << 20), 1), "total_s": result["total_seconds"],
                "downtime_ms": round(downtime_ms, 3), "interface_check_ms": check_ms,
                "apply_ms": apply_ms, "check_share_pct": round(100 * check_ms / downtime_ms, 3),
                "pvmit_share_pct": round(100 * (check_ms + apply_ms) / downtime_ms, 3)}
    finally:
        src.stop()
        dst.stop()


def bench(sizes: list[str], repeats: int, catalogs: list[str],
          progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sizes}
    for r in range(repeats):
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="pvmit-bench-") as d:
                run = one(size, Path(d), catalogs)
            runs[size].append(run)
            progress(f"repeat {r + 1}/{repeats} {size}: total {run['total_s']} s, downtime {run['downtime_ms']} ms, "
                     f"interface checks {run['interface_check_ms']} ms ({run['check_share_pct']}%), applying the "
                     f"controls {run['apply_ms']} ms (pvmit in all {run['pvmit_share_pct']}%)")
    summary = {}
    for size, rs in runs.items():
        summary[size] = {k: statistics.median(r[k] for r in rs) for k in
                         ("total_s", "downtime_ms", "interface_check_ms", "apply_ms", "check_share_pct",
                          "pvmit_share_pct", "mib_sent")}
        summary[size]["mode"] = rs[0]["mode"]
    return {"schema": "pvmit.bench-migrate/1", "repeats": repeats, "median": summary, "runs": runs,
            "target_check_share_pct": 1.0}
