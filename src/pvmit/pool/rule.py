"""The pool rule: which speculation bits a pool of hosts may show its guests. Pure: facts in, verdicts out.

A guest decides its mitigations once, from what it is shown. A bit shown in a pool must therefore be true on every
host the VM can reach, or a guest that trusted it is unmitigated after migration. `pool_bits` answers, for every bit
of IA32_ARCH_CAPABILITIES and the speculation CPUID leaves (pool/bits.toml), whether the pool may show it and why,
plus MITIGATION_ENUM for the pool (pvmit's own interface). `shown_bit_reasons` is the same rule for one VM and one
destination: the migration check, the VMM and the fleet planner call it so that a VM shown a bit at boot is refused
on a host where that bit is false.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from typing import Literal

from pvmit.affected import affected
from pvmit.catalog.facts import CpuFacts
from pvmit.x86.bits import MitigationEnum
from pvmit.x86.feature_names import feature_names
from pvmit.x86.registers import REGISTERS, Register

Rule = Literal["unaffected", "all", "any", "clear", "always", "never"]
CHECKED_RULES = ("unaffected", "all", "clear")
"""Rules whose bits, once shown, must stay true: a VM shown one is refused where the host cannot keep it."""
_VENDORS = {"intel": ("intel",), "amd": ("amd", "hygon")}
_FIELDS = {"register", "name", "rule", "bug", "vendor", "note"}


@dataclass(frozen=True)
class PoolBit:
    """One guest-visible bit and how a pool decides it (one row of pool/bits.toml), and its names in QEMU's and
    libvirt's vocabulary (from `pvmit.x86.feature_names`, the table the libvirt reader uses too)."""

    register: Register
    name: str
    rule: Rule
    bug: str
    vendor: str  # "intel" or "amd": the guests that read this register
    note: str

    @property
    def qemu(self) -> str:
        """QEMU's name for the bit; "" where QEMU has none."""
        f = feature_names().of_bit(self.register.key, self.name)
        return f.qemu if f else ""

    @property
    def libvirt(self) -> str:
        """The name libvirt's CPU map defines for the bit; "" where it has none yet."""
        f = feature_names().of_bit(self.register.key, self.name)
        return f.libvirt if f else ""

    @property
    def key(self) -> str:
        """The bit's name in pvmit's JSON: 'register_key.BIT' (PSFD and SSB_NO exist in two registers)."""
        return f"{self.register.key}.{self.name}"

    @property
    def mask(self) -> int:
        return self.register.bit(self.name)


@lru_cache(maxsize=1)
def pool_bit_table() -> tuple[PoolBit, ...]:
    """The table in pool/bits.toml, validated: every register and bit name exists, every rule is known, and the
    bits' QEMU and libvirt names are not repeated there (they live in x86/data/feature_names.toml)."""
    doc = tomllib.loads((resources.files("pvmit.pool") / "bits.toml").read_text(encoding="utf-8"))
    out = []
    for row in doc["bit"]:
        if extra := sorted(set(row) - _FIELDS):
            raise ValueError(f"pool/bits.toml: {row.get('name')}: unknown field(s) {', '.join(extra)} (QEMU and "
                             "libvirt names are in x86/data/feature_names.toml)")
        reg = REGISTERS[row["register"]]
        reg.bit(row["name"])  # KeyError for a bit the layout does not name
        if row["rule"] not in ("unaffected", "all", "any", "clear", "always", "never"):
            raise ValueError(f"pool/bits.toml: {row['name']}: unknown rule {row['rule']!r}")
        out.append(PoolBit(reg, row["name"], row["rule"], row.get("bug", ""), row["vendor"], row.get("note", "")))
    return tuple(out)


@dataclass(frozen=True)
class BitVerdict:
    show: bool
    why: str

    def to_json(self) -> dict[str, object]:
        return {"show": int(self.show), "why": self.why}


@dataclass(frozen=True)
class Pool:
    """What a pool of hosts may show its guests."""

    hosts: tuple[str, ...]
    vendor: str | None  # the pool's guest vendor; None when the hosts mix vendors
    bits: dict[str, BitVerdict]
    mitigation_enum: int
    warnings: tuple[str, ...] = field(default=())

    def shown(self, register_key: str) -> int:
        """The bits of one register this pool shows."""
        return sum(b.mask for b in pool_bit_table()
                   if b.register.key == register_key and self.bits[b.key].show)

    def decided(self, register_key: str) -> int:
        """The bits of one register the pool rule decides (shown or hidden); the others are left as they are."""
        return sum(b.mask for b in pool_bit_table() if b.register.key == register_key and b.rule != "never")

    def to_json(self) -> dict[str, object]:
        enum = MitigationEnum(self.mitigation_enum)
        return {
            "schema": "pvmit.pool/1",
            "hosts": list(self.hosts),
            "vendor": self.vendor,
            "bits": {k: v.to_json() for k, v in self.bits.items()},
            "mitigation_enum": {"value": self.mitigation_enum,
                                "bits": [str(b.name) for b in MitigationEnum if b & enum]},
            "warnings": list(self.warnings),
        }


def _fact_one(cpu: CpuFacts, bit: PoolBit) -> bool:
    """A sourced 1 (an inferred 1 does not count for a bit whose 1 is the risky answer)."""
    f = cpu.fact(bit.register.key, bit.name)
    return bool(f.value) and not f.inferred


def _decide(bit: PoolBit, hosts: Sequence[tuple[str, CpuFacts]], vendor: str | None) -> BitVerdict:
    if bit.rule == "never":
        return BitVerdict(False, f"never shown: {bit.note}")
    if vendor is None:
        return BitVerdict(False, "the pool mixes CPU vendors: no guest can migrate between them, nothing is shown")
    if vendor not in _VENDORS[bit.vendor]:
        return BitVerdict(False, f"an {bit.vendor.upper()} register, which {vendor.upper()} guests are not shown")
    if bit.rule == "always":
        return BitVerdict(True, f"provided on every host: {bit.note}")
    if bit.rule == "all":
        for name, cpu in hosts:
            if not _fact_one(cpu, bit):
                f = cpu.fact(bit.register.key, bit.name)
                return BitVerdict(False, f"{name} does not have it: {f.cite()}")
        return BitVerdict(True, f"every host has it ({', '.join(n for n, _ in hosts)})")
    if bit.rule == "any":
        for name, cpu in hosts:
            f = cpu.fact(bit.register.key, bit.name)
            if f.value is None or f.value or f.inferred:
                return BitVerdict(True, f"{name} has or may have it ({f.cite()}): showing it is the safe answer")
        return BitVerdict(False, "no host has it (each reads 0 from a source)")
    if bit.rule == "unaffected":
        for name, cpu in hosts:
            found = affected(cpu, bit.bug)
            if found.answer:
                return BitVerdict(False, f"{name}: {found.reason}")
        return BitVerdict(True, f"no host is affected by {bit.bug.upper().replace('_', ' ')} "
                                f"({', '.join(n for n, _ in hosts)})")
    # "clear": some host affected, and every affected host has the clearing microcode
    needing = [(name, cpu) for name, cpu in hosts if affected(cpu, bit.bug).answer]
    if not needing:
        return BitVerdict(False, f"no host is affected by {bit.bug.upper()}: nothing to clear")
    for name, cpu in needing:
        if not _fact_one(cpu, bit):
            return BitVerdict(False, f"{name} is affected by {bit.bug.upper()} without it "
                                     f"({cpu.fact(bit.register.key, bit.name).cite()}): no bit makes a guest safe "
                                     "there, so keep such hosts out of the pool")
    return BitVerdict(True, f"every affected host ({', '.join(n for n, _ in needing)}) has it")


def pool_vendor(facts: Iterable[CpuFacts]) -> str | None:
    vendors = {"amd" if f.vendor == "hygon" else f.vendor for f in facts}
    return vendors.pop() if len(vendors) == 1 else None


def pool_bits(hosts: Sequence[tuple[str, CpuFacts]]) -> Pool:
    """For every guest-visible bit, whether a pool of `hosts` (name, facts) may show it, and why."""
    if not hosts:
        raise ValueError("a pool needs at least one host")
    vendor = pool_vendor(f for _, f in hosts)
    warnings = []
    if vendor is None:
        warnings.append("the hosts mix CPU vendors; a VM cannot migrate between Intel and AMD hosts")
    vendor_of_bits = vendor or ""
    bits = {b.key: _decide(b, hosts, vendor_of_bits or None) for b in pool_bit_table()}
    from pvmit.interface.policy import supported_requests  # the interface package imports this module

    enum = supported_requests(f for _, f in hosts)
    return Pool(tuple(n for n, _ in hosts), vendor, bits, enum, tuple(warnings))


def _facts_key(cpu: CpuFacts) -> tuple[object, ...]:
    return (cpu.vendor, cpu.family, cpu.model, cpu.stepping,
            tuple(sorted((k, r.value, r.known, r.inferred) for k, r in cpu.registers.items())))


_SAFE: dict[tuple[object, ...], dict[str, tuple[int, dict[str, str]]]] = {}
_SAFE_MAX = 4096  # distinct host fact sets kept; a fleet has a few dozen


def _host_safe(host: CpuFacts) -> dict[str, tuple[int, dict[str, str]]]:
    """Per register: the checked bits that stay true on `host` for a guest shown them, and why each other one does
    not. The pool rule for one host, except that a "clear" bit also stays true where the host is not affected at
    all (the guest's clearing is then harmless), which a pool does not bother to show."""
    vendor = "amd" if host.vendor == "hygon" else host.vendor
    out: dict[str, tuple[int, dict[str, str]]] = {}
    for b in pool_bit_table():
        if b.rule not in CHECKED_RULES:
            continue
        mask, why = out.get(b.register.key, (0, {}))
        if vendor not in _VENDORS[b.vendor]:
            ok, reason = False, f"an {b.vendor.upper()} register, and this host is {host.vendor.upper()}"
        elif b.rule == "clear":
            found = affected(host, b.bug)
            ok = not found.answer or _fact_one(host, b)
            reason = f"{found.reason}, and {host.fact(b.register.key, b.name).cite()}"
        elif b.rule == "all":  # the host's best-known value: an inferred 1 counts, as the guest was shown it so
            f = host.fact(b.register.key, b.name)
            ok, reason = bool(f.value), f"this host does not have it: {f.cite()}"
        else:
            verdict = _decide(b, [("this host", host)], vendor)
            ok, reason = verdict.show, verdict.why.removeprefix("this host: ").removeprefix("this host ")
        if ok:
            mask |= b.mask
        else:
            why[b.name] = reason
        out[b.register.key] = (mask, why)
    return out


def host_safe_bits(host: CpuFacts) -> dict[str, tuple[int, dict[str, str]]]:
    """`_host_safe` for `host`, computed once per distinct set of facts (bounded: the cache is cleared when full)."""
    key = _facts_key(host)
    found = _SAFE.get(key)
    if found is None:
        if len(_SAFE) >= _SAFE_MAX:
            _SAFE.clear()
        found = _SAFE[key] = _host_safe(host)
    return found


def shown_bit_violations(personality: CpuFacts, host: CpuFacts) -> tuple[tuple[str, str], ...]:
    """Each bit the VM was shown (a checked bit set in its boot personality) that is false on `host`, as
    ('REGISTER.BIT', reason). Empty when every shown bit stays true here."""
    out = []
    for reg_key, (mask, why) in host_safe_bits(host).items():
        shown = personality.reg(reg_key).value & _checked_mask(reg_key)
        if not shown & ~mask:
            continue
        for name in _names(reg_key, shown & ~mask):
            bit = f"{REGISTERS[reg_key].name}.{name}"
            out.append((bit, f"the VM was shown {bit} at boot, which is false on this host "
                             f"({why.get(name, 'not true here')}): a guest that trusted it would be unmitigated"))
    return tuple(out)


def shown_bit_reasons(personality: CpuFacts, host: CpuFacts) -> tuple[str, ...]:
    """Why `host` cannot take a VM booted with `personality` (the reasons of `shown_bit_violations`)."""
    return tuple(r for _, r in shown_bit_violations(personality, host))


@cache
def _checked_mask(reg_key: str) -> int:
    return sum(b.mask for b in pool_bit_table() if b.register.key == reg_key and b.rule in CHECKED_RULES)


def _names(reg_key: str, mask: int) -> list[str]:
    reg = REGISTERS[reg_key]
    return [n for n in reg.bit_names() if reg.bit(n) & mask]


def personality_for_pool(personality: CpuFacts, pool: Pool) -> CpuFacts:
    """What a VM booted with `personality` is shown in `pool`: its bits, kept only where the pool may show them, and
    the pool's "not affected" bits synthesised as KVM does (ITS_NO, TSA_SQ_NO, MDS_NO, ...). Behaviours the pool
    has (RRSBA, RSBA) are added, and what the hypervisor always provides is set. Bits the rule does not decide and
    the other vendor's registers are left as the personality has them. A VM shown this is refused by no host of the
    pool for a bit (`shown_bit_violations`)."""
    from pvmit.catalog.facts import RegisterFacts

    regs = dict(personality.registers)
    for b in pool_bit_table():
        if b.rule == "never" or pool.vendor is None or b.vendor != pool.vendor:
            continue
        rf = personality.reg(b.register.key)
        had = bool(rf.value & b.mask)
        show = pool.bits[b.key].show
        value = {"unaffected": show, "always": True, "any": had or show}.get(b.rule, had and show)
        rf = regs.get(b.register.key, rf)
        regs[b.register.key] = RegisterFacts(
            rf.register, (rf.value & ~b.mask) | (b.mask if value else 0), rf.known | b.mask,
            {**rf.sources, b.name: f"pool of {', '.join(pool.hosts)}: {pool.bits[b.key].why}"},
            rf.unknown_reason, rf.inferred & ~b.mask)
    return CpuFacts(personality.vendor, personality.family, personality.model, personality.stepping, regs,
                    personality.identity_source)
