"""`pvmit bench fleet`: plan a large fleet end to end and report seconds and peak memory against the targets.

The inventory (by default a generated 1,000,000-VM, 10,000-host Parquet inventory; generating it is not timed) is
planned by a fresh `python -m pvmit fleet plan INVENTORY --output DIR` process pinned to `cores` CPUs (affinity,
and OMP_NUM_THREADS for Arrow's thread pool). Timed: that whole process, from interpreter start to the Parquet
tables written: imports, catalog, reading the Parquet inventory, checking rows, classes, class-pair decisions,
per-VM answers, pools, output. Peak memory: that process's maximum resident set size (wait4's rusage). Its CPU
time and the load average (before and after) are reported beside, because on a shared machine wall time includes
waiting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvmit.catalog.loader import Catalog

TARGET_SECONDS = 5.0  # issue 18: 10,000,000 VMs over 100,000 hosts, pool enumeration included, on 2 cores
TARGET_RSS_BYTES = 2 * 1024**3


def _pin(cores: int) -> tuple[list[int], Callable[[], None] | None]:
    """The CPUs the planner may use, and a pre-exec hook that pins the child to them."""
    try:
        avail = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [], None
    chosen = avail[:cores]
    return chosen, lambda: os.sched_setaffinity(0, chosen)


def _rows(inventory: Path, table: str) -> int | None:
    """Rows of a Parquet table of an inventory directory, from its footer (None for other inventories)."""
    import pyarrow.parquet as pq

    path = inventory / f"{table}.parquet"
    return int(pq.ParquetFile(path).metadata.num_rows) if path.is_file() else None


def run(catalog: Catalog, vms: int | None, hosts: int | None, cores: int, inventory: Path | None = None, seed: int = 1,
        catalogs: tuple[Path, ...] = (), progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Generate (unless given) and plan an inventory in a pinned child process; return the figures."""
    from pvmit.fleet.generate import generate, write_inventory

    with tempfile.TemporaryDirectory(prefix="pvmit-bench-fleet-") as tmp:
        gen_seconds = None
        if inventory is None:
            assert vms is not None and hosts is not None
            t = time.perf_counter()
            progress(f"generating {vms:,} VMs over {hosts:,} hosts (not timed)")
            h, v = generate(catalog, vms, hosts, seed)
            inventory = Path(tmp) / "inventory"
            write_inventory(h, v, inventory, "parquet")
            del h, v
            gen_seconds = time.perf_counter() - t
            progress(f"generated in {gen_seconds:.1f} s: {inventory}")
        else:
            vms, hosts = _rows(inventory, "vms"), _rows(inventory, "hosts")
        size = sum(p.stat().st_size for p in inventory.rglob("*") if p.is_file()) if inventory.is_dir() \
            else inventory.stat().st_size
        out_dir = Path(tmp) / "plan"
        cpus, pin = _pin(cores)
        cmd = [sys.executable, "-m", "pvmit", *(a for c in catalogs for a in ("--catalog", str(c))), "fleet",
               "plan", str(inventory), "--output", str(out_dir), "--format", "parquet", "--progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus) or cores)}
        progress(f"timing: {' '.join(cmd[1:])} on CPUs {cpus or 'unpinned'}")
        load_before = list(os.getloadavg())
        t = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                 preexec_fn=pin)  # noqa: PLW1509 - affinity must be set before the child starts
        assert child.stderr is not None
        stages = []
        for line in child.stderr:
            line = line.rstrip("\n")
            stages.append(line)
            progress(f"  {line}")
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        tables = sorted(p.name for p in out_dir.glob("*.parquet")) if out_dir.is_dir() else []
    rss = int(usage.ru_maxrss) * 1024  # kilobytes on Linux
    return {
        "schema": "pvmit.bench-fleet/1",
        "vms": vms, "hosts": hosts, "cores": len(cpus) or cores, "cpus": cpus,
        "inventory_bytes": size, "generate_seconds": gen_seconds,
        "command": cmd[1:], "exit_status": child.returncode, "stages": stages, "tables_written": tables,
        "seconds": seconds, "target_seconds": TARGET_SECONDS, "seconds_ratio": seconds / TARGET_SECONDS,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # the child's user + system time, whatever else runs
        "load_average": list(os.getloadavg()), "load_average_before": load_before,
        "peak_rss_bytes": rss, "target_rss_bytes": TARGET_RSS_BYTES, "rss_ratio": rss / TARGET_RSS_BYTES,
        "within_targets": child.returncode == 0 and seconds < TARGET_SECONDS and rss < TARGET_RSS_BYTES,
    }
