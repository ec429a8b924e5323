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
    inferred: bool = False  # the source states a rule for a class of parts, applied here to this one

    @property
    def known(self) -> bool:
        return self.value is not None

    def sure(self, protects: bool) -> bool | None:
        """The value for a decision in which `protects` is the guest-protecting answer: an inferred fact counts
        only when it points that way; otherwise it is treated as unknown."""
        if self.inferred and self.value is not protects:
            return None
        return self.value

    def cite(self) -> str:
        """A short phrase for reasons: 'ARCH_CAPABILITIES.RRSBA=1 [source]'."""
        shown = {True: "1", False: "0", None: "unknown"}[self.value]
        return f"{REGISTERS[self.register].name}.{self.bit}={shown}{' (inferred)' if self.inferred else ''} " \
               f"[{self.source}]"


@dataclass(frozen=True)
class RegisterFacts:
    """A register's value as far as it is known: `value` holds the bits known set, `known` every known bit."""

    register: Register
    value: int = 0
    known: int = 0
    sources: Mapping[str, str] = field(default_factory=dict)
    unknown_reason: str = "no source gives this bit"
    inferred: int = 0  # known bits whose source is a rule for a class of parts rather than about this part

    def __post_init__(self) -> None:
        if self.value & ~self.known:
            raise ValueError(f"{self.register.name}: bits {self.value & ~self.known:#x} set but not known")

    def fact(self, bit: str) -> Fact:
        mask = self.register.bit(bit)
        if not self.known & mask:
            return Fact(self.register.key, bit, None, self.unknown_reason)
        source = self.sources.get(bit) or self.sources.get("*", "unspecified")
        return Fact(self.register.key, bit, bool(self.value & mask), source, bool(self.inferred & mask))

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

    @classmethod
    def from_json(cls, doc: object) -> CpuFacts:
        """Read facts back from `to_json` output (also the `facts` of `pvmit host --json`). ValueError names
        the field that is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("CPU facts: expected a JSON object")

        def num(v: object, what: str, bits: int) -> int:
            if isinstance(v, str):
                try:
                    v = int(v, 0)
                except ValueError:
                    raise ValueError(f"CPU facts: {what} {v!r} is not a number") from None
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << bits:
                raise ValueError(f"CPU facts: {what} must be an unsigned {bits}-bit number, not {v!r}")
            return v

        vendor = doc.get("vendor")
        if vendor not in VENDOR_IDS:
            raise ValueError(f"CPU facts: vendor {vendor!r} is not one of {', '.join(VENDOR_IDS)}")
        regs_in = doc.get("registers", {})
        if not isinstance(regs_in, dict):
            raise ValueError("CPU facts: registers must be an object")
        registers: dict[str, RegisterFacts] = {}
        for key, r in regs_in.items():
            reg = REGISTERS.get(key)
            if reg is None or reg not in CPU_FACT_REGISTERS:
                raise ValueError(f"CPU facts: unknown register {key!r}")
            if not isinstance(r, dict):
                raise ValueError(f"CPU facts: registers.{key} must be an object")
            value = num(r.get("value", 0), f"registers.{key}.value", reg.width)
            known = num(r.get("known_mask", 0), f"registers.{key}.known_mask", reg.width)
            if value & ~known:
                raise ValueError(f"CPU facts: registers.{key}: value has bits outside known_mask")
            sources = r.get("sources") or {}
            if not isinstance(sources, dict) or not all(isinstance(s, str) for s in sources.values()):
                raise ValueError(f"CPU facts: registers.{key}.sources must map bit names to strings")
            inferred = num(r.get("inferred_mask", 0), f"registers.{key}.inferred_mask", reg.width)
            registers[key] = RegisterFacts(reg, value, known, dict(sources),
                                           str(r.get("unknown_reason") or "no source gives this bit"),
                                           inferred & known)
        stepping_in = doc.get("stepping")
        family, model = num(doc.get("family"), "family", 12), num(doc.get("model"), "model", 8)
        stepping = None if stepping_in is None else num(stepping_in, "stepping", 8)
        if "linux_blacklist" not in registers:  # written before pvmit kept Linux's lists: from the identity
            from pvmit.catalog.linux_lists import blacklist_facts

            registers["linux_blacklist"] = blacklist_facts(vendor, family, [model],
                                                           None if stepping is None else [stepping])
        return cls(vendor, family, model, stepping, registers, str(doc.get("identity_source", "")))

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
    """Stable JSON for one register's facts. Numbers are hex strings (64-bit values do not survive JSON doubles)."""
    masks = rf.register._masks
    named = rf.register.named_mask
    known_set = [n for n, b in masks.items() if rf.known & b and rf.value & b]
    known_clear = [n for n, b in masks.items() if rf.known & b and not rf.value & b]
    return {
        "value": f"{rf.value:#x}",
        "known_mask": f"{rf.known:#x}",
        "set": known_set,
        "clear": known_clear,
        "unnamed_set": f"{rf.value & ~named:#x}",
        "inferred_mask": f"{rf.inferred:#x}",
        "all_known": rf.known == rf.register.mask,
        "sources": dict(rf.sources),
        "unknown_reason": rf.unknown_reason if rf.known != rf.register.mask else None,
    }
