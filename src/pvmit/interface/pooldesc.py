"""The pool description: the CPU implementations a VM may run on, as the VMM tells its guest (pvmit's proposal).

arm64 KVM lets the VMM tell a guest every CPU implementation it may be exposed to "due to scheduling/migration"
(hypercalls ARM_SMCCC_VENDOR_HYP_KVM_DISCOVER_IMPL_VER / _IMPL_CPUS, Linux 6.15,
Documentation/virt/kvm/arm/hypercalls.rst): a version and a count, then one MIDR/REVIDR/AIDR triple per index, from
which the guest enables the errata of every listed CPU. x86 has no equivalent; pvmit's neutral form carries one as
read-only MSRs (docs/interface.md section 10):

  POOL_INFO          bits 7:0 the number of entries N (1..MAX_ENTRIES), bits 15:8 the version (1), the rest 0
  POOL_INFO + 1 + i  entry i < N: bits 31:0 a CPUID.(1).EAX signature whose stepping field is the lowest stepping,
                     bits 35:32 the highest stepping, bits 43:40 the vendor (1 Intel, 2 AMD, 3 Hygon), the rest 0

Every register is read-only (WRMSR raises #GP) and an entry at or past N raises #GP on RDMSR, as an index past the
count makes DISCOVER_IMPL_CPUS answer INVALID_PARAMETER. One entry per (vendor, family, model), its steppings a range.
The encoding is pure and shared: the guest agent decodes with its own copy (agent/wire.py), tested to agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pvmit.catalog.facts import CpuFacts

MAX_ENTRIES = 32
"""At most this many implementations: a pool over every Intel generation pvmit's catalog knows needs 28. Bounded so
that a guest reads a fixed block of MSRs and a VMM routes one range of them."""
VERSION = 1
VENDOR_CODES = {"intel": 1, "amd": 2, "hygon": 3}
VENDOR_NAMES = {v: k for k, v in VENDOR_CODES.items()}


def signature(family: int, model: int, stepping: int) -> int:
    """CPUID.(1).EAX for a display family/model/stepping (SDM vol. 2A, CPUID leaf 1; the inverse of Linux's
    x86_family/x86_model)."""
    base_family, ext_family = (family, 0) if family < 0xF else (0xF, family - 0xF)
    ext_model = (model >> 4) & 0xF if family >= 6 else 0
    return ((ext_family & 0xFF) << 20) | (ext_model << 16) | ((base_family & 0xF) << 8) | ((model & 0xF) << 4) | (
        stepping & 0xF)


@dataclass(frozen=True, order=True)
class Implementation:
    """One CPU implementation a VM may run on: vendor, display family and model, a range of steppings."""

    vendor: str
    family: int
    model: int
    stepping_min: int = 0
    stepping_max: int = 15

    def __post_init__(self) -> None:
        if self.vendor not in VENDOR_CODES:
            raise ValueError(f"vendor {self.vendor!r} is not one of {', '.join(VENDOR_CODES)}")
        if not 0 <= self.family <= 0xF + 0xFF:
            raise ValueError(f"family {self.family:#x} does not fit CPUID.(1).EAX")
        if not 0 <= self.model <= 0xFF or (self.family < 6 and self.model > 0xF):
            raise ValueError(f"model {self.model:#x} does not fit CPUID.(1).EAX for family {self.family:#x}")
        if not 0 <= self.stepping_min <= self.stepping_max <= 15:
            raise ValueError(f"steppings {self.stepping_min}..{self.stepping_max} are not a range within 0..15")

    def encode(self) -> int:
        return signature(self.family, self.model, self.stepping_min) | (self.stepping_max << 32) | (
            VENDOR_CODES[self.vendor] << 40)

    @classmethod
    def decode(cls, value: int) -> Implementation:
        """ValueError for a value no VMM writes (reserved bits, an unknown vendor)."""
        if value & ~((1 << 36) - 1 | (0xF << 40)) or value & (0xF << 12) or value & (0xF << 28):
            raise ValueError(f"pool entry {value:#x}: reserved bits set")
        vendor = VENDOR_NAMES.get((value >> 40) & 0xF)
        if vendor is None:
            raise ValueError(f"pool entry {value:#x}: unknown vendor code {(value >> 40) & 0xF}")
        eax = value & 0xFFFF_FFFF
        family, model = (eax >> 8) & 0xF, (eax >> 4) & 0xF
        if family == 0xF:
            family += (eax >> 20) & 0xFF
        if family >= 6:
            model |= ((eax >> 16) & 0xF) << 4
        return cls(vendor, family, model, eax & 0xF, (value >> 32) & 0xF)

    def covers(self, vendor: str, family: int, model: int, stepping: int | None) -> bool:
        """Is a CPU of this identity one of these? An unknown stepping is covered only by the full range."""
        if (vendor, family, model) != (self.vendor, self.family, self.model):
            return False
        if stepping is None:
            return (self.stepping_min, self.stepping_max) == (0, 15)
        return self.stepping_min <= stepping <= self.stepping_max

    @property
    def label(self) -> str:
        steps = "any stepping" if (self.stepping_min, self.stepping_max) == (0, 15) else (
            f"stepping {self.stepping_min}" if self.stepping_min == self.stepping_max
            else f"steppings {self.stepping_min}-{self.stepping_max}")
        return f"{self.vendor} family {self.family:#x} model {self.model:#x} {steps}"

    def to_json(self) -> dict[str, object]:
        return {"vendor": self.vendor, "family": self.family, "model": self.model,
                "stepping_min": self.stepping_min, "stepping_max": self.stepping_max, "value": hex(self.encode())}

    @classmethod
    def from_json(cls, doc: object) -> Implementation:
        if not isinstance(doc, dict):
            raise ValueError("a pool entry must be an object")
        try:
            fields = [doc[k] for k in ("family", "model", "stepping_min", "stepping_max")]
        except KeyError as e:
            raise ValueError(f"a pool entry has no {e.args[0]!r}") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in fields):
            raise ValueError("a pool entry's family, model and steppings must be integers")
        return cls(str(doc.get("vendor")), *fields)


def describe(cpus: Iterable[tuple[str, int, Sequence[int], Sequence[int]]]) -> tuple[Implementation, ...]:
    """The entries for a pool of CPUs given as (vendor, family, model numbers, known steppings): one per (vendor,
    family, model), its stepping range the lowest to the highest known stepping, or every stepping where one CPU's
    is unknown. ValueError past MAX_ENTRIES."""
    ranges: dict[tuple[str, int, int], tuple[int, int]] = {}
    for vendor, family, models, steppings in cpus:
        low, high = (min(steppings), max(steppings)) if steppings else (0, 15)
        for model in models:
            key = (vendor, family, model)
            old = ranges.get(key)
            ranges[key] = (low, high) if old is None else (min(old[0], low), max(old[1], high))
    if len(ranges) > MAX_ENTRIES:
        raise ValueError(f"the pool has {len(ranges)} CPU implementations; a pool description holds at most "
                         f"{MAX_ENTRIES}")
    return tuple(sorted(Implementation(v, f, m, lo, hi) for (v, f, m), (lo, hi) in ranges.items()))


def describe_facts(hosts: Iterable[CpuFacts]) -> tuple[Implementation, ...]:
    """`describe` for hosts known by their facts (a host reading: one model, one stepping or none)."""
    return describe((h.vendor, h.family, (h.model,), () if h.stepping is None else (h.stepping,)) for h in hosts)


def not_listed_reasons(pool: tuple[Implementation, ...] | None, host: CpuFacts) -> tuple[str, ...]:
    """Why `host` cannot take a VM that was given `pool` as the CPUs it may run on (empty when it can): a guest
    that enabled the workarounds of the listed CPUs only may lack this one's."""
    if pool is None or any(e.covers(host.vendor, host.family, host.model, host.stepping) for e in pool):
        return ()
    step = "unknown stepping" if host.stepping is None else f"stepping {host.stepping}"
    return (f"the VM was told at boot it may run on {'; '.join(e.label for e in pool)}; this host ({host.vendor} "
            f"family {host.family:#x} model {host.model:#x} {step}) is not among them: a guest that chose its "
            f"mitigations for the listed CPUs may be unmitigated here",)


def cpu_history(models: Iterable[Any]) -> dict[str, Any]:
    """The table the guest agent ships (agent/cpu_history.json): per catalog model and model number, whether the
    short BHB-clearing loop is enough there and whether retpoline is safe, as `pvmit.derive` answers from the
    catalog's facts, with derive's reasons (each citing its sources). One copy of each rule: the table is derive's
    answers written out for a guest that has no catalog; tests/test_bhi.py checks it is current."""
    from pvmit.derive import bhb_short_effective, retpoline_effective

    rows = []
    for m in models:
        bhb = bhb_short_effective(m.facts)
        ret = retpoline_effective(m.facts)
        history = "long" if not bhb.answer else "not affected" if "not affected" in bhb.reason else "short"
        for number in m.models:
            rows.append({"cpu": m.id, "vendor": m.vendor, "family": m.family, "model": number,
                         "steppings": list(m.steppings), "bhb_history": history,
                         "retpoline": "safe" if ret.answer else "unsafe",
                         "why": {"bhb": bhb.reason, "retpoline": ret.reason}})
    return {"schema": "pvmit.cpu-history/1",
            "what": "per CPU model: 'long' where the short BHB-clearing loop (5x5) is too short, 'short' where it is "
                    "enough, 'not affected' where BHI does not apply; whether retpoline is safe. Written from pvmit's "
                    "catalog by pvmit.interface.pooldesc.cpu_history (tools/agent_table.py); the reasons cite the "
                    "catalog's sources (docs/sources.md)",
            "cpus": rows}
