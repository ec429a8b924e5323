"""`pvmit oracle linux`: boot every selected case, evaluate it, and make one document (recorded as
tests/fixtures/linux_oracle.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pvmit.catalog.loader import Catalog
from pvmit.oracle import initramfs
from pvmit.oracle.boot import BASE_APPEND, BootFailed, Seen, boot, find_qemu, qemu_version
from pvmit.oracle.cases import Case
from pvmit.oracle.compare import evaluate
from pvmit.userfiles import FileError, MiB, read_bytes, write_atomic

SCHEMA = "pvmit.linux-oracle/2"
CONFIG_OPTIONS = ("CONFIG_KVM", "CONFIG_RETPOLINE", "CONFIG_MITIGATION_RETPOLINE", "CONFIG_CPU_IBRS_ENTRY",
                  "CONFIG_MITIGATION_IBRS_ENTRY", "CONFIG_CALL_DEPTH_TRACKING",
                  "CONFIG_MITIGATION_SPECTRE_BHI", "CONFIG_MITIGATION_ITS", "CONFIG_MITIGATION_CALL_DEPTH_TRACKING")
"""The build options of the kernel under test that the model's choice depends on (recorded from /boot/config-*)."""


def kernel_config(release: str, boot: Path = Path("/boot")) -> dict[str, str]:
    """CONFIG_OPTIONS as the kernel's config file names them ('n' for '# ... is not set', and for CONFIG_KVM when
    absent); {} when there is no config file."""
    path = boot / f"config-{release}"
    try:
        text = read_bytes(path, "kernel config", 16 * MiB).decode("utf-8", "replace")
    except FileError:
        return {}
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in CONFIG_OPTIONS:
            found[key] = value
        elif line.startswith("# ") and line.endswith(" is not set") and line[2:-11] in CONFIG_OPTIONS:
            found[line[2:-11]] = "n"
    if not found:
        return {}
    return {"CONFIG_KVM": "n"} | {k: found[k] for k in CONFIG_OPTIONS if k in found}  # (options renamed between
    # versions appear only under the name the kernel uses: CONFIG_RETPOLINE became CONFIG_MITIGATION_RETPOLINE)


def observed(seen: Seen, kvm: bool | None = None) -> dict[str, Any]:
    """What a boot showed, in the recorded form `compare.evaluate` reads. `kvm`: whether the kernel was built with
    KVM (its /boot/config; None when unknown, which the model reads as built with it)."""
    agent = seen.agent or {}
    decision = agent.get("decision") or {}
    iface = agent.get("interface") or {}
    return {
        "kernel": {"release": seen.release, "version": seen.version, "kvm": kvm},
        "proc_cmdline": seen.cmdline,
        "sysfs": {k: seen.vulnerabilities.get(k) for k in ("spectre_v2", "retbleed", "spectre_v1",
                                                            "indirect_target_selection")},
        "bugs": seen.bugs,
        "flags": seen.flags,
        "cpu": agent.get("cpu"),
        "agent": {"exit_status": seen.agent_exit, "relies_on": decision.get("relies_on"),
                  "request_bits": decision.get("request_bits"), "reasons": decision.get("reasons"),
                  "interface": (iface.get("chosen") or {}).get("form", "not offered") if iface else None,
                  "probes": iface.get("probes"), "stderr": seen.agent_stderr},
        "seconds": seen.seconds,
    }


def _package(release: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}", f"linux-image-{release}"],
                       capture_output=True, text=True, timeout=30)
    return p.stdout.strip() or None


def run(cases: list[Case], catalog: Catalog, *, kernel: Path | None = None, python: Path | None = None,
        qemu: str | None = None, jobs: int | None = None, timeout: float = 120,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Boot and evaluate `cases`; boots that fail are listed under 'failures' with the reason."""
    k = initramfs.find_kernel(kernel)
    q = find_qemu(qemu)
    progress(f"building the initramfs for {k.release} (busybox, msr/cpuid modules, python3, the agent)")
    image = initramfs.build(k, python)
    config = kernel_config(k.release)
    kvm = None if not config else config["CONFIG_KVM"] in ("y", "m")
    results: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, str]] = []
    versions: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="pvmit-oracle-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(image)

        def one(case: Case) -> None:
            try:
                seen = boot(q, k, initrd, case, timeout)
            except BootFailed as e:
                failures.append({"id": case.id, "error": str(e)})
                progress(f"{case.id}: boot failed")
                return
            versions.add(seen.version)
            results[case.id] = evaluate(case, observed(seen, kvm), catalog)
            r = results[case.id]
            progress(f"{case.id}: {seen.seconds:.0f} s, {'as expected' if r['as_expected'] else 'UNEXPECTED'}")

        with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(one, cases))
    ordered = [results[c.id] for c in cases if c.id in results]
    return {
        "schema": SCHEMA,
        "kernel": {"release": k.release, "image": str(k.image), "package": _package(k.release),
                   "version": sorted(versions)[0] if len(versions) == 1 else sorted(versions), "config": config},
        "qemu": qemu_version(q),
        "accel": "tcg",
        "base_cmdline": BASE_APPEND,
        "cases": ordered,
        "failures": failures,
        "summary": summary(ordered, failures),
    }


def summary(results: list[dict[str, Any]], failures: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "cases": len(results),
        "agree": sum(all(r["agree"].values()) for r in results),
        "known_disagreements": sum(r["expect"] != "agree" and r["as_expected"] for r in results),
        "unexpected": [r["id"] for r in results if not r["as_expected"]],
        "failed_boots": [f["id"] for f in failures],
    }


def ok(doc: dict[str, Any]) -> bool:
    return not doc["summary"]["unexpected"] and not doc["summary"]["failed_boots"]


def record(doc: dict[str, Any], path: Path) -> None:
    write_atomic(path, json.dumps(doc, indent=1) + "\n")


def verdict(r: dict[str, Any]) -> str:
    """'yes', or which agreements failed, and whether that was a documented disagreement."""
    text = "yes" if all(r["agree"].values()) else "no (" + ", ".join(k for k, v in r["agree"].items() if not v) + ")"
    if r["expect"] != "agree":
        text += ", documented" if r["as_expected"] else ", documented but now agrees"
    return text


def markdown_table(doc: dict[str, Any]) -> str:
    """The results as the Markdown table docs/linux-guests.md shows (`pvmit oracle linux --markdown`)."""
    rows = ["| case | `-cpu` | command line | kernel printed (mode; BHI; ITS) | pvmit predicts | agent in the guest "
            "| agree |", "|---|---|---|---|---|---|---|"]
    for r in doc["cases"]:
        line = r["observed"]["sysfs"]["spectre_v2"]
        bhi = next((f for f in line.split("; ") if f.startswith("BHI:")), "no BHI field")
        its = r["observed"]["sysfs"].get("indirect_target_selection") or "no ITS file"
        p, agent = r["prediction"], r["observed"]["agent"]
        rows.append(f"| `{r['id']}` | {r['cpu']} | {'`' + r['cmdline'] + '`' if r['cmdline'] else '-'} | "
                    f"{line.split(';')[0]}; {bhi}; ITS: {its} | {p['sysfs_mode']}; {p['sysfs_bhi'] or 'no BHI field'}; "
                    f"ITS: {p['sysfs_its'] or 'no ITS file'} | "
                    f"{', '.join(agent['relies_on'] or []) or 'nothing'} | {verdict(r)} |")
    return "\n".join(rows)
