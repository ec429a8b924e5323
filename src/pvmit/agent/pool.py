"""The pool description as the guest reads it, and what it means for the mitigations this kernel chose. Pure but
for reading the shipped table.

The hypervisor lists the CPU implementations the VM may run on (docs/interface.md section 10). The agent reads the
list, classifies each entry with cpu_history.json (pvmit.derive's answers for every catalog CPU, shipped with the
agent), and warns where the kernel relies on a mitigation that a listed CPU defeats and the hypervisor does not
promise to make up for (MITIGATION_ENUM): the short BHB-clearing loop on a CPU with the longer branch history,
retpoline on a CPU whose RET may predict from the BTB. Each warning names the command-line option that fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from pvmit.agent import wire

Rdmsr = Callable[[int], "int | None"]
_BHB_ORDER = ("long", "unknown", "short", "not affected")  # worst first
_RETPOLINE_ORDER = ("unsafe", "unknown", "safe")

FIX_BHB = ("boot with spectre_bhi=long (the proposed option, BHI policy cmdline-long; a kernel that does not know it "
           "ignores it: 'Ignoring unknown spectre_bhi option'), run a kernel that honours LONG_BHB_NEEDED, or run "
           "under a hypervisor that forces BHI_DIS_S (BHI policy force-bhi-dis-s: it then promises "
           "BHB_CLEAR_SEQ_S_USED in MITIGATION_ENUM)")
FIX_RETPOLINE = ("boot with spectre_v2=ibrs (IBRS on kernel entry instead of retpoline; Intel CPUs), or run under a "
                 "hypervisor that promises RETPOLINE_S_USED in MITIGATION_ENUM")


@lru_cache(maxsize=1)
def table() -> list[dict[str, Any]]:
    """cpu_history.json, shipped beside this file."""
    doc = json.loads((Path(__file__).parent / "cpu_history.json").read_text(encoding="utf-8"))
    rows: list[dict[str, Any]] = doc["cpus"]
    return rows


def classify(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry with what the table says of the CPUs it covers: the worst branch-history and retpoline answers
    (a CPU the table does not know counts as 'unknown', which warns like the worst)."""
    rows = [r for r in table() if (r["vendor"], r["family"], r["model"]) == (
        entry["vendor"], entry["family"], entry["model"]) and (
        not r["steppings"] or any(entry["stepping_min"] <= s <= entry["stepping_max"] for s in r["steppings"]))]
    bhb = [r["bhb_history"] for r in rows] or ["unknown"]
    ret = [r["retpoline"] for r in rows] or ["unknown"]
    return {**entry, "cpus": sorted({r["cpu"] for r in rows}),
            "bhb_history": min(bhb, key=_BHB_ORDER.index), "retpoline": min(ret, key=_RETPOLINE_ORDER.index)}


def label(entry: dict[str, Any]) -> str:
    name = "/".join(entry["cpus"]) or "a CPU pvmit does not know"
    steps = (f"stepping {entry['stepping_min']}" if entry["stepping_min"] == entry["stepping_max"] else
             f"steppings {entry['stepping_min']}-{entry['stepping_max']}")
    return f"{name} ({entry['vendor']} {entry['family']:#x}/{entry['model']:#x} {steps})"


def read(rdmsr: Rdmsr, info_msr: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries POOL_INFO at `info_msr` announces, classified; and what went wrong reading them."""
    info = rdmsr(info_msr)
    if info is None:
        return [], [f"POOL_INFO {info_msr:#x} faulted although the form enumerates it"]
    count, version = info & 0xFF, (info >> 8) & 0xFF
    problems = [] if version == 1 else [f"POOL_INFO {info:#x}: version {version}, the agent knows 1"]
    if not 1 <= count <= wire.POOL_MAX_ENTRIES:
        return [], problems + [f"POOL_INFO {info:#x}: {count} entries, not 1 to {wire.POOL_MAX_ENTRIES}"]
    entries = []
    for i in range(count):
        raw = rdmsr(info_msr + 1 + i)
        if raw is None:
            problems.append(f"pool entry {i} ({info_msr + 1 + i:#x}) faulted within the count")
            continue
        try:
            entries.append({"index": i, "value": hex(raw), **classify(wire.decode_pool_entry(raw))})
        except ValueError as e:
            problems.append(str(e))
    return entries, problems


def warnings(entries: list[dict[str, Any]], *, short_loop: bool, retpoline: bool, supported: int,
             long_bit: bool) -> list[dict[str, str]]:
    """Where this kernel's choice is defeated on a listed CPU (or, for the loop, where the hypervisor says the long
    one is needed) and the hypervisor does not promise to make up for it."""
    out = []
    long = [label(e) for e in entries if e["bhb_history"] in ("long", "unknown")]
    if short_loop and not supported & wire.BHB_CLEAR_SEQ_S_USED and (long or long_bit):
        where = f"the longer branch history of {', '.join(long)}" if long else "the CPUs of this pool"
        out.append({"mitigation": "bhb-short", "fix": "spectre_bhi=long",
                    "message": f"this kernel clears branch history with the short (5x5) loop, which does not clear "
                               f"{where}" + (" (the hypervisor shows LONG_BHB_NEEDED)" if long_bit else "")
                               + f", and the hypervisor does not promise BHI_DIS_S for it: {FIX_BHB}"})
    unsafe = [label(e) for e in entries if e["retpoline"] in ("unsafe", "unknown")]
    if retpoline and unsafe and not supported & wire.RETPOLINE_S_USED:
        out.append({"mitigation": "retpoline", "fix": "spectre_v2=ibrs",
                    "message": f"this kernel uses retpoline, which {', '.join(unsafe)} defeat (RET may predict from "
                               f"the BTB there), and the hypervisor does not promise RRSBA_DIS_S for it: "
                               f"{FIX_RETPOLINE}"})
    return out
