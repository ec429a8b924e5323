"""Real-hardware register readings (tests/fixtures/firecracker/*.json, cut by tools/firecracker_fixtures.py) as the
registers pvmit describes, with the bits of each that say what the hardware has (pvmit.x86.kvm_view)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pvmit.host.cpuid import family_model_stepping
from pvmit.x86.kvm_view import KVM_VIEWS

FIXTURES = Path(__file__).parent / "fixtures" / "firecracker"


@dataclass(frozen=True)
class Reading:
    path: Path
    model: str  # the catalog model it is a reading of
    vendor: str
    family: int
    cpu_model: int
    stepping: int
    values: dict[str, int]  # register key -> value as the guest read it
    informative: dict[str, int]  # register key -> bits that say what the hardware has

    @property
    def source(self) -> str:
        return self.path.name


def load(path: Path) -> Reading:
    doc = json.loads(path.read_text(encoding="utf-8"))
    cpuid, msr = doc["cpuid"], doc["msr"]
    family, model, stepping = family_model_stepping(int(cpuid["0x1.0"]["eax"], 16))
    vendor = "amd" if family >= 0xF else "intel"

    def reg(leaf: str, out: str) -> int | None:
        return int(cpuid[leaf][out], 16) if leaf in cpuid else None

    values: dict[str, int | None] = {
        "arch_capabilities": int(msr["0x10a"], 16) if "0x10a" in msr else None,
        "cpuid_7_0_edx": reg("0x7.0", "edx"),
        # a leaf-7 maximum subleaf below 2 means subleaf 2 does not exist: every bit of it is 0
        "cpuid_7_2_edx": reg("0x7.2", "edx") if int(cpuid["0x7.0"]["eax"], 16) >= 2 else 0,
        "cpuid_80000008_ebx": reg("0x80000008.0", "ebx"),
        "cpuid_80000021_eax": reg("0x80000021.0", "eax"),
    }
    known = {k: v for k, v in values.items() if v is not None}
    informative = {k: view.informative(v) for k, v in known.items()
                   if (view := KVM_VIEWS.get((vendor, k))) is not None}
    return Reading(path, doc["model"], vendor, family, model, stepping, known, informative)


def readings() -> list[Reading]:
    return [load(p) for p in sorted(FIXTURES.glob("*.json"))]
