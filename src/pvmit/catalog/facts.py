"""Facts about one CPU as pvmit holds them: each bit of each speculation register is set, clear or unknown,
and every known bit carries the source it came from.

A catalog entry and a live host reading produce the same `CpuFacts`, so every decision downstream is made by the
same code whichever way the facts arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pvmit.x86.registers import CPU_FACT_REGISTERS, REGISTERS, Register

Vendor = Literal["intel", "amd", "hygon"]
VENDOR_STRINGS: dict[str, Vendor] = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon"}
"""CPUID leaf 0 vendor strings (EBX, EDX, ECX)."""
VENDOR_IDS: dict[Vendor, str] = {v: k for k, v in VENDOR_STRINGS.items()}


@dataclass(frozen=True)
class Fact:
    """One bit: True/False when a source says so, None when unknown (then `source` says why it is unknown)."""

    register: str
    bit: str
    value: bool | None
    source: str

    @property
    def known(self) -> bool:
        return self.value is not None

    def cite(self) -> str:
        """A short phrase for reasons: 'ARCH_CAPABILITIES.RRSBA=1 [source]'."""
        shown = {True: "1", False: "0", None: "unknown"}[self.value]
        return f"{REGISTERS[self.register].name}.{self.bit}={shown} [{self.source}]"


@dataclass(frozen=True)
class RegisterFacts:
    """A register's value as far as it is known: `value` holds the bits known set, `known` every known bit."""

    register: Register
    value: int = 0
    known: int = 0
    sources: Mapping[str, str] = field(default_factory=dict)
    unknown_reason: str = "no source gives this bit"

    def __post_init__(self) -> None:
        if self.value & ~self.known:
            raise ValueError(f"{self.register.name}: bits {self.value & ~self.known:#x} set but not known")

    def fact(self, bit: str) -> Fact:
        mask = self.register.bit(bit)
        if not self.known & mask:
            return Fact(self.register.key, bit, None, self.unknown_reason)
        source = self.sources.get(bit) or self.sources.get("*", "unspecified")
        return Fact(self.register.key, bit, bool(self.value & mask), source)

    @classmethod
    def exact(cls, register: Register, value: int, source: str) -> RegisterFacts:
        """A register read in full (from hardware or KVM): every bit known, one source for all."""
        return cls(register, value & register.mask, register.mask, {"*": source})

    @classmethod
    def unknown(cls, register: Register, reason: str) -> RegisterFacts:
        return cls(register, 0, 0, {}, reason)


@dataclass(frozen=True)
class CpuFacts:
    """Identity and speculation-register facts of one CPU, from the catalog or from a live host."""

    vendor: Vendor
    family: int
    model: int
    stepping: int | None
    registers: Mapping[str, RegisterFacts]
    identity_source: str = ""

    def reg(self, key: str) -> RegisterFacts:
        return self.registers.get(key) or RegisterFacts.unknown(REGISTERS[key], "register not described")

    def fact(self, key: str, bit: str) -> Fact:
        return self.reg(key).fact(bit)

    def to_json(self) -> dict[str, object]:
        return {
            "vendor": self.vendor,
            "family": self.family,
            "model": self.model,
            "stepping": self.stepping,
            "identity_source": self.identity_source,
            "registers": {
                r.key: register_facts_json(self.reg(r.key)) for r in CPU_FACT_REGISTERS
            },
        }


def register_facts_json(rf: RegisterFacts) -> dict[str, object]:
    """Stable JSON for one register's facts: value and known mask, named set/clear bits, sources."""
    set_bits = [n for n in rf.register.bit_names() if rf.known & rf.register.bit(n) and rf.value & rf.register.bit(n)]
    clear_bits = [
        n for n in rf.register.bit_names() if rf.known & rf.register.bit(n) and not rf.value & rf.register.bit(n)
    ]
    return {
        "value": f"{rf.value:#x}",
        "known_mask": f"{rf.known:#x}",
        "set": set_bits,
        "clear": clear_bits,
        "all_known": rf.known == rf.register.mask,
        "sources": dict(rf.sources),
        "unknown_reason": rf.unknown_reason if rf.known != rf.register.mask else None,
    }
