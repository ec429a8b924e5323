"""`pvmit bench migrate`: total migration time and guest downtime, side by side with QEMU's own migration.

For each guest size and memory content (all zero; all random) it migrates, in one run:
- pvmit: two real `pvmit vmm` processes over a Unix socket; and, with `--tls`, over loopback TCP with mutual TLS
  (the cost of encryption, beside the plain run);
- QEMU (where qemu-system-x86_64 is installed): two `qemu-system-x86_64 -accel tcg` processes of the same memory
  size and content (random content put in guest RAM with `-device loader`), migrated with QMP `migrate` to a Unix
  socket, read back with `query-migrate` (total-time, downtime, transferred).
It reports total time; downtime end to end (the guest stopped on the source to running on the destination: pvmit's
logged monotonic times, QEMU's STOP and RESUME event timestamps) and as the source sees it (until pvmit's commit is
acknowledged; QEMU's own `downtime`, which ends when the source has sent everything); the bytes sent; the share of
pvmit's downtime spent in its interface checks and in applying the forced controls; and the ratios pvmit / QEMU.
Figures only: nothing here passes or fails on a time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvmit.net.tls import make_test_ca
from pvmit.node.cluster import PAUSED, RESUMED, VmmHandle

FILLS = ("zero", "random")
QEMU = "qemu-system-x86_64"
LOAD_AT = 1 << 20  # random content goes above the first MiB (BIOS areas), as pvmit's above its page tables


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pvmit_run(size: str, fill: str, transport: str, work: Path, catalogs: list[str]) -> dict[str, Any]:
    """One pvmit migration of a `size` guest whose free memory is all zero or all random."""
    creds = None
    if transport == "tls":
        creds = work / "pki"
        make_test_ca(creds, ["127.0.0.1"])
        to = f"tcp:127.0.0.1:{_port()}"
    else:
        to = f"unix:{work / 'dst.mig'}"
    fill_args = ["--fill-memory", "random"] if fill == "random" else []
    src = VmmHandle(work, "src", ["--guest-cpu", "icelake-server-v2", "--host-cpu", "icelake-sp", "--pool",
                                  "sapphirerapids", "--memory", size, *fill_args], catalogs=catalogs, creds=creds,
                    timeout=180)
    dst = VmmHandle(work, "dst", ["--incoming", to, "--host-cpu", "sapphirerapids"], catalogs=catalogs, creds=creds)
    try:
        src.wait_counts(3, timeout=180)
        result = src.migrate(to)
        if not result["migrated"]:
            raise RuntimeError(f"benchmark migration failed: {result['reason']}")
        dst.wait_counts(1, timeout=60)
        paused, resumed = src.monotonic(PAUSED), dst.monotonic(RESUMED)
        assert paused is not None and resumed is not None
        downtime_ms = (resumed - paused) * 1e3
        committed = result.get("committed_at") or resumed
        check_ms = float(result["ready"]["interface_check_ms"])
        apply_ms = float(result["ready"]["apply_ms"])
        return {"size": size, "fill": fill, "transport": transport, "mode": result["mode"],
                "rounds": result["rounds"], "pages": result["pages_sent"], "zero_pages": result["zero_pages"],
                "mib_sent": round(result["bytes_sent"] / (1 << 20), 2), "total_s": result["total_seconds"],
                "downtime_ms": round(downtime_ms, 3), "source_downtime_ms": round((committed - paused) * 1e3, 3),
                "interface_check_ms": check_ms, "apply_ms": apply_ms,
                "check_share_pct": round(100 * check_ms / downtime_ms, 3),
                "pvmit_share_pct": round(100 * (check_ms + apply_ms) / downtime_ms, 3)}
    finally:
        src.stop()
        dst.stop()


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.events: list[tuple[str, float]] = []
        self.f = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("QEMU closed its QMP socket")
            doc = json.loads(line)
            if "event" not in doc:
                return dict(doc)
            ts = doc.get("timestamp", {})
            self.events.append((str(doc["event"]), ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6))

    def event_time(self, name: str, timeout: float = 10) -> float | None:
        """The wall-clock time QEMU stamped on the first `name` event, waiting for it up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for event, when in self.events:
                if event == name:
                    return when
            if time.monotonic() > deadline:
                return None
            self.cmd("query-status")  # reads whatever events came meanwhile
            time.sleep(0.01)

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        doc = self._read()
        if "error" in doc:
            raise RuntimeError(f"QMP {name}: {doc['error']}")
        return doc.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def qemu_run(size: str, fill: str, work: Path, qemu: str) -> dict[str, Any]:
    """The same migration by QEMU: TCG guests of `size`, memory all zero or random, QMP migrate to a Unix socket."""
    mib = int(size.rstrip("MmGg")) * (1024 if size[-1] in "Gg" else 1)
    common = [qemu, "-accel", "tcg", "-m", f"{mib}M", "-nodefaults", "-no-user-config", "-display", "none",
              "-vga", "none", "-serial", "none", "-monitor", "none"]
    if fill == "random":
        blob = work / "random.bin"
        with blob.open("wb") as f:
            left = (mib << 20) - LOAD_AT - (1 << 20)  # leave the top MiB to the firmware's tables
            while left > 0:
                chunk = min(left, 16 << 20)
                f.write(os.urandom(chunk))
                left -= chunk
        common += ["-device", f"loader,file={blob},addr={LOAD_AT},force-raw=on"]
    procs = []
    try:
        src = subprocess.Popen([*common, "-qmp", f"unix:{work / 'qsrc.qmp'},server=on,wait=off"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dst = subprocess.Popen([*common, "-qmp", f"unix:{work / 'qdst.qmp'},server=on,wait=off", "-incoming",
                                "defer"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs = [src, dst]
        qs, qd = Qmp(work / "qsrc.qmp"), Qmp(work / "qdst.qmp")
        qd.cmd("migrate-incoming", uri=f"unix:{work / 'q.mig'}")
        time.sleep(0.5)  # let the source's firmware run a moment: a running guest, as pvmit's
        t0 = time.monotonic()
        qs.cmd("migrate", uri=f"unix:{work / 'q.mig'}")
        while True:
            info = qs.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.002)
        wall = time.monotonic() - t0
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration {info.get('status')}: {info.get('error-desc', '')}")
        ram = info.get("ram", {})
        stopped, resumed = qs.event_time("STOP"), qd.event_time("RESUME")
        qs.close()
        qd.close()
        if stopped is None or resumed is None:
            raise RuntimeError("QEMU sent no STOP or RESUME event")
        return {"size": size, "fill": fill, "transport": "qemu unix", "total_s": info["total-time"] / 1e3,
                "wall_s": round(wall, 4), "downtime_ms": round((resumed - stopped) * 1e3, 3),
                "source_downtime_ms": float(info.get("downtime", 0)),
                "mib_sent": round(ram.get("transferred", 0) / (1 << 20), 2), "zero_pages": ram.get("duplicate", 0),
                "pages": ram.get("normal", 0)}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def bench(sizes: list[str], repeats: int, catalogs: list[str], *, fills: tuple[str, ...] = FILLS,
          tls: bool = False, vs_qemu: bool = False, progress: Callable[[str], None] = lambda m: None
          ) -> dict[str, Any]:
    qemu = shutil.which(QEMU) if vs_qemu else None
    runs: dict[str, list[dict[str, Any]]] = {}
    transports = ["unix", *(["tls"] if tls else [])]
    for r in range(repeats):
        for size in sizes:
            for fill in fills:
                for transport in [*transports, *(["qemu"] if qemu else [])]:
                    with tempfile.TemporaryDirectory(prefix="pvmit-bench-") as d:
                        if transport == "qemu":
                            assert qemu is not None
                            run = qemu_run(size, fill, Path(d), qemu)
                        else:
                            run = pvmit_run(size, fill, transport, Path(d), catalogs)
                    runs.setdefault(f"{size} {fill} {transport}", []).append(run)
                    progress(f"repeat {r + 1}/{repeats} {size} {fill} {run['transport']}: total "
                             f"{run['total_s']:.4f} s, downtime {run['downtime_ms']:.3f} ms, "
                             f"{run['mib_sent']} MiB sent")
    median: dict[str, dict[str, Any]] = {}
    for key, rs in runs.items():
        m: dict[str, Any] = {k: statistics.median(x[k] for x in rs)
                             for k in ("total_s", "downtime_ms", "source_downtime_ms", "mib_sent")}
        for k in ("interface_check_ms", "apply_ms", "check_share_pct", "pvmit_share_pct"):
            if k in rs[0]:
                m[k] = statistics.median(x[k] for x in rs)
        m.update(size=rs[0]["size"], fill=rs[0]["fill"], transport=rs[0]["transport"], mode=rs[0].get("mode", "-"))
        median[key] = m
    ratios = {}
    for size in sizes:
        for fill in fills:
            q = median.get(f"{size} {fill} qemu")
            for transport in transports:
                p = median.get(f"{size} {fill} {transport}")
                if q and p:
                    ratios[f"{size} {fill} {transport}"] = {
                        "total_vs_qemu": round(p["total_s"] / q["total_s"], 3) if q["total_s"] else None,
                        "downtime_vs_qemu": round(p["downtime_ms"] / q["downtime_ms"], 3) if q["downtime_ms"]
                        else None}
            u, t = median.get(f"{size} {fill} unix"), median.get(f"{size} {fill} tls")
            if u and t:
                ratios[f"{size} {fill} tls vs unix"] = {"total": round(t["total_s"] / u["total_s"], 3)}
    return {"schema": "pvmit.bench-migrate/2", "repeats": repeats, "median": median, "runs": runs,
            "ratios": ratios, "qemu": qemu or (f"not run: {QEMU} not found" if vs_qemu else "not asked"),
            "targets": {"total_vs_qemu_random": 1.0, "total_vs_qemu_zero": 3.0, "downtime_vs_qemu": 1.0,
                        "check_share_pct": 1.0},
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}}
