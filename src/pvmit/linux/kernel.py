"""Kernel versions, and which of Linux's version rules (linux/kernels.toml) a given kernel has. Pure.

A version is the upstream one (x.y.z): a stable release carries a rule when its branch is at or past the mainline
release that introduced it, or when it is at or past the first release of its branch that took the backport.
Distribution version strings are read for the upstream version they carry (Debian: "6.12.117+deb12-amd64",
"... Debian 6.1.192-2" in /proc/version); vendor kernels that backport on their own (Ubuntu's 6.8.0-NN, RHEL) do
not say which rules they carry, and a version pvmit cannot place is refused, never guessed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache, total_ordering
from importlib import resources
from typing import Any

from pvmit.errors import InputError

OLDEST = (5, 10)
NEWEST = (6, 18)
"""The versions the rules cover: 5.10 to 6.18."""


@total_ordering
@dataclass(frozen=True)
class KernelVersion:
    """An upstream kernel version: major.minor.sublevel (sublevel 0 for a mainline release)."""

    major: int
    minor: int
    sublevel: int = 0

    @property
    def branch(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def branch_name(self) -> str:
        return f"{self.major}.{self.minor}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return (self.major, self.minor, self.sublevel) < (other.major, other.minor, other.sublevel)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"

    @classmethod
    def parse(cls, text: str) -> KernelVersion:
        """'6.12', '6.1.192', a release such as '6.12.117+deb12-amd64', or /proc/version text (the Debian package
        version in it wins over the ABI name: 'Linux version 6.1.0-56-amd64 ... Debian 6.1.192-2'). InputError when
        no version is found or it lies outside 5.10-6.18."""
        text = text.strip()
        m = re.match(r"(?:Linux version )?(\d+)\.(\d+)(?:\.(\d+))?(?![\d.])", text)
        if m is None:
            raise InputError(f"kernel version {text[:80]!r}: expected MAJOR.MINOR[.SUBLEVEL] (such as 6.1.192)")
        v = cls(int(m[1]), int(m[2]), int(m[3] or 0))
        # Debian's ABI name (6.1.0-56-amd64) hides the sublevel that its package version gives: "Debian 6.1.192-2"
        # (only one of the same branch: /proc/version also names the compiler, "gcc-12 (Debian 12.2.0-14)")
        same = [d for d in re.finditer(r"\bDebian (\d+)\.(\d+)\.(\d+)", text)
                if (int(d[1]), int(d[2])) == v.branch]
        if same:
            v = cls(v.major, v.minor, int(same[-1][3]))
        if not OLDEST <= v.branch <= NEWEST:
            raise InputError(f"kernel version {v}: pvmit's model of Linux covers "
                             f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}")
        return v


LATEST = KernelVersion(*NEWEST)
"""What the model predicts when no version is given: mainline 6.18."""


@dataclass(frozen=True)
class Rule:
    """One change of Linux's behaviour, with the versions that have it."""

    id: str
    what: str
    since: tuple[int, int]
    commits: tuple[str, ...]
    stable: dict[tuple[int, int], KernelVersion] = field(default_factory=dict)
    unsourced: frozenset[tuple[int, int]] = frozenset()
    absent: dict[tuple[int, int], str] = field(default_factory=dict)
    source: str = ""

    @property
    def cite(self) -> str:
        return f"{self.id} (since {self.since[0]}.{self.since[1]}, {self.commits[0].split()[0]})"

    def present(self, v: KernelVersion) -> bool:
        """Does kernel `v` have this change? InputError when its branch took a backport at an unknown release."""
        if v.branch >= self.since:
            return True
        if v.sublevel == 0:
            return False  # a mainline release before `since`: backports reach stable releases only
        first = self.stable.get(v.branch)
        if first is not None:
            return v >= first
        if v.branch in self.unsourced:
            raise InputError(
                f"kernel {v}: the {v.branch_name}.y branch took '{self.id}' ({self.commits[0]}) at a release pvmit "
                f"has no source for; give a mainline release or a version of a branch listed in "
                f"linux/kernels.toml")
        return False


def _branch(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return (int(major), int(minor))


@lru_cache(maxsize=1)
def rules() -> dict[str, Rule]:
    """Every rule of linux/kernels.toml, by id (checked: each stable release belongs to the branch it is listed
    under and predates the mainline release)."""
    doc: dict[str, Any] = tomllib.loads((resources.files("pvmit.linux") / "kernels.toml").read_text(encoding="utf-8"))
    out: dict[str, Rule] = {}
    for r in doc["rule"]:
        stable = {_branch(b): KernelVersion.parse(v) for b, v in r.get("stable", {}).items()}
        rule = Rule(r["id"], r["what"], _branch(r["since"]), tuple(r["commits"]), stable,
                    frozenset(_branch(b) for b in r.get("unsourced", ())),
                    {_branch(b): why for b, why in r.get("absent", {}).items()}, r["source"])
        for b, first in stable.items():
            if first.branch != b or b >= rule.since:
                raise ValueError(f"kernels.toml: {rule.id}: stable {first} is not an older branch {b}")
        if rule.id in out:
            raise ValueError(f"kernels.toml: {rule.id} twice")
        out[rule.id] = rule
    return out


@dataclass(frozen=True)
class Kernel:
    """The guest (or host) kernel being modelled: its version and the build options that change its choice."""

    version: KernelVersion = LATEST
    kvm: bool = True  # CONFIG_KVM: Debian builds it (=m); with attack vectors (6.17+) it decides the BHI default

    def has(self, rule_id: str) -> bool:
        return rules()[rule_id].present(self.version)

    def __str__(self) -> str:
        return f"Linux {self.version}" + ("" if self.kvm else " without KVM")


CURRENT = Kernel()
"""The default: mainline 6.18 built with KVM, as Debian builds it."""
