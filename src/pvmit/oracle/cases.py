"""The oracle's cases (cases.toml): QEMU CPU model x kernel command line, with the personality template that
describes what the model shows a guest under TCG and what pvmit expects of the comparison."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from pvmit.errors import InputError
from pvmit.safetext import quoted


@dataclass(frozen=True)
class Case:
    id: str
    cpu: str  # QEMU -cpu model
    cmdline: str  # what the case adds to the kernel command line
    why: str
    expect: str  # "agree" or "disagree: <kernel source line that explains it>"

    @property
    def personality(self) -> str:
        """The template for what this QEMU model shows a guest under TCG."""
        return f"qemu-tcg-{self.cpu.lower()}"

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "cpu": self.cpu, "cmdline": self.cmdline, "personality": self.personality,
                "why": self.why, "expect": self.expect}


@lru_cache(maxsize=1)
def all_cases() -> tuple[Case, ...]:
    doc = tomllib.loads((resources.files("pvmit.oracle") / "cases.toml").read_text(encoding="utf-8"))
    cases = tuple(Case(c["id"], c["cpu"], c["cmdline"], c["why"], c["expect"]) for c in doc["case"])
    for c in cases:
        if c.expect != "agree" and not c.expect.startswith("disagree: "):
            raise ValueError(f"cases.toml: {c.id}: expect must be 'agree' or 'disagree: why'")
    return cases


def select(names: str | None) -> list[Case]:
    """Cases by comma-separated ids or QEMU model names (any case); all when `names` is None or 'all'."""
    cases = list(all_cases())
    if names is None or names.strip() == "all":
        return cases
    chosen: list[Case] = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        hits = [c for c in cases if name.lower() in (c.id.lower(), c.cpu.lower())]
        if not hits:
            raise InputError(f"--cases: no case or CPU model {quoted(name)}; cases: {', '.join(c.id for c in cases)}")
        chosen += [c for c in hits if c not in chosen]
    return chosen
