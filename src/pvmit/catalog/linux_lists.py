"""Linux's cpu_vuln_blacklist[] (linux_blacklist.toml) applied to a CPU's identity: which bugs Linux sets for it.

Linux decides a part's Retbleed, ITS, GDS, RFDS, MMIO Stale Data, SRSO and TSA status partly from this per-model
table (common.c cpu_set_bug_bits). pvmit keeps the outcome as the `linux_blacklist` facts of a CPU, filled from the
identity wherever the identity is known: catalog entries, live hosts, host fact files. Where the identity leaves
the row open (a catalog entry that covers several steppings or models, or a hybrid part whose boot core type is
unknown) and the candidate rows disagree on a flag, that flag is unknown, and decisions treat it conservatively.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from pvmit.catalog.facts import RegisterFacts
from pvmit.x86.registers import LINUX_BLACKLIST

SOURCE = "linux-common"
"""The catalog source key of common.c (00-sources.toml), which the facts cite."""
STEPPINGS = range(16)  # CPUID.1.EAX[3:0]
CPU_TYPES = ("core", "atom")  # the hybrid core types VULNBL_INTEL_TYPE distinguishes


@dataclass(frozen=True)
class Row:
    name: str
    vendor: str
    family: int
    model: int | None
    max_stepping: int | None
    cpu_type: str | None
    flags: int

    def matches(self, vendor: str, family: int, model: int, stepping: int, cpu_type: str) -> bool:
        return (self.vendor == vendor and self.family == family and self.model in (None, model)
                and (self.max_stepping is None or stepping <= self.max_stepping)
                and self.cpu_type in (None, cpu_type))

    def label(self) -> str:
        names = " | ".join(str(b.name) for b in LINUX_BLACKLIST.layout if b & self.flags)
        bound = f" steppings <= {self.max_stepping:#x}" if self.max_stepping is not None else ""
        return f"{self.name}{bound}: {names}"


@lru_cache(maxsize=1)
def rows() -> tuple[Row, ...]:
    """The table, in the kernel's order (the first matching row wins, as in x86_match_cpu)."""
    doc = tomllib.loads((resources.files("pvmit.catalog") / "linux_blacklist.toml").read_text(encoding="utf-8"))
    return tuple(Row(r["name"], r["vendor"], r["family"], r.get("model"), r.get("max_stepping"), r.get("cpu_type"),
                     sum(LINUX_BLACKLIST.bit(f) for f in r["flags"])) for r in doc["row"])


def match(vendor: str, family: int, model: int, stepping: int, cpu_type: str) -> Row | None:
    """The row x86_match_cpu() would find for this exact identity, or None (not on the list)."""
    return next((r for r in rows() if r.matches(vendor, family, model, stepping, cpu_type)), None)


def blacklist_facts(vendor: str, family: int, models: Iterable[int], steppings: Iterable[int] | None = None,
                    cpu_type: str | None = None) -> RegisterFacts:
    """Linux's flags for every identity a CPU may have: `steppings` None or empty means any stepping, `cpu_type`
    None any core type. A flag all candidate rows agree on is known; one they disagree on is unknown."""
    models = list(models)
    steps = list(steppings or ()) or list(STEPPINGS)
    types = [cpu_type] if cpu_type else list(CPU_TYPES)
    found = {match(vendor, family, m, s, t) for m in models for s in steps for t in types}
    named = LINUX_BLACKLIST.mask
    flags = [r.flags if r else 0 for r in found]
    known = named
    for f in flags:
        known &= ~(f ^ flags[0])
    value = flags[0] & known
    where = f"{vendor} family {family:#x} model {', '.join(f'{m:#x}' for m in models)}"
    labels = sorted(r.label() if r else f"no entry for {where}" for r in found)
    detail = labels[0] if len(labels) == 1 else "one of " + "; ".join(labels)
    source = f"{SOURCE}: cpu_vuln_blacklist {detail}"
    reason = f"Linux's cpu_vuln_blacklist row for {where} depends on the stepping or core type: {'; '.join(labels)}"
    return RegisterFacts(LINUX_BLACKLIST, value, known, {"*": source}, reason)
