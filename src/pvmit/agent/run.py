"""What `status` and `report` do, step by step, against a `Machine` (the real one or a test's fake). Every step
adds what it learned to one report document, so a failure still shows everything learned before it.

Order: the kernel's choice (sysfs, /proc/cmdline) -> root -> CPUID -> discovery (RDMSR on the first online CPU)
-> per online CPU: read the CTRL register, and for `report` write the request bits and read them back.
"""

from __future__ import annotations

from typing import Protocol

from pvmit.agent import pool
from pvmit.agent.decide import decide
from pvmit.agent.discover import Cpuid, Offer, discover, identify
from pvmit.agent.errors import STATUS_TEXT, AgentError, Status
from pvmit.agent.msrdev import write_refusal
from pvmit.agent.wire import REQUEST_BITS, bit_names

SCHEMA = "pvmit.guest-agent/1"
SPECTRE_V2 = "/sys/devices/system/cpu/vulnerabilities/spectre_v2"
ITS = "/sys/devices/system/cpu/vulnerabilities/indirect_target_selection"
CMDLINE = "/proc/cmdline"


class Msr(Protocol):
    def read(self, cpu: int, index: int) -> int | None: ...

    def write(self, cpu: int, index: int, value: int) -> None: ...


class Machine(Protocol):
    """The agent's view of the system it runs on."""

    def euid(self) -> int: ...

    def release(self) -> str: ...

    def read(self, path: str) -> str | None: ...

    def cpuid(self) -> tuple[Cpuid, str]: ...

    def msr(self) -> Msr: ...

    def online_cpus(self) -> list[int]: ...

    def lockdown(self) -> str | None: ...

    def allow_writes(self) -> str | None: ...


def _names(bits: int) -> list[str]:
    return [n for n, b in (("bhb-short", 1), ("retpoline", 2)) if bits & b]


def run(command: str, dry_run: bool, m: Machine) -> tuple[dict[str, object], Status]:
    """Do `command` ('status' or 'report'); the report document and the exit status."""
    doc: dict[str, object] = {"schema": SCHEMA, "command": command, "dry_run": dry_run}
    try:
        status = _run(command, dry_run, m, doc)
        doc["outcome"] = {"status": int(status), "meaning": STATUS_TEXT[status], "error": None}
    except AgentError as e:
        status = e.status
        doc["outcome"] = {"status": int(status), "meaning": STATUS_TEXT[status], "error": str(e)}
    return doc, status


def _run(command: str, dry_run: bool, m: Machine, doc: dict[str, object]) -> Status:
    line, cmdline, its = m.read(SPECTRE_V2), m.read(CMDLINE) or "", m.read(ITS)
    doc["kernel"] = {"release": m.release(), "cmdline": cmdline, "spectre_v2": line,
                     "indirect_target_selection": its}
    if line is None:
        raise AgentError(Status.KERNEL_UNKNOWN, f"{SPECTRE_V2} cannot be read (sysfs not mounted, or a kernel "
                                                "before 4.15): cannot tell which mitigations the kernel uses")
    decision = decide(line, cmdline, its)
    doc["decision"] = decision.to_json()
    if m.euid() != 0:
        raise AgentError(Status.NOT_ROOT, "the agent must run as root: CPUID and MSRs are read through the "
                                          "root-only /dev/cpu/N devices")
    cpuid, method = m.cpuid()
    doc["cpu"] = {**identify(cpuid), "cpuid_method": method}
    msr, cpus = m.msr(), m.online_cpus()
    found = discover(cpuid, lambda index: msr.read(cpus[0], index))
    offer = found.chosen
    doc["interface"] = {"chosen": offer.to_json() if offer else None, "offers": [o.to_json() for o in found.offers],
                        "probes": list(found.probes)}
    if offer is None:
        raise AgentError(Status.NOT_OFFERED, "the hypervisor offers no form of the mitigation interface "
                                             "(see the probes): nothing to report to")
    if offer.pool_msr:  # the CPUs this VM may run on, and whether one of them defeats what the kernel chose
        entries, problems = pool.read(lambda index: msr.read(cpus[0], index), offer.pool_msr)
        doc["pool"] = {"entries": entries, "problems": problems}
    else:
        entries = []
        doc["pool"] = None
    doc["warnings"] = pool.warnings(entries, short_loop=decision.bhb_short, retpoline=decision.retpoline,
                                    supported=offer.supported, long_bit=offer.long_bhb)
    value = decision.bits & offer.supported
    uncovered = decision.bits & ~offer.supported & REQUEST_BITS
    doc["request"] = {"value": hex(value), "bits": bit_names(value), "relies_on_unsupported": _names(uncovered)}
    action = "check" if command == "status" else "plan" if dry_run else "write"
    if action == "plan":
        locked, allow = m.lockdown(), m.allow_writes()
        if locked not in (None, "none") or allow == "off":
            e = write_refusal(locked, allow)
            raise AgentError(e.status, f"{e} (dry run: nothing was written)")
    rows: list[dict[str, object]] = []
    doc["cpus"] = rows
    first_problem: AgentError | None = None
    for cpu in cpus:
        row: dict[str, object] = {"cpu": cpu}
        rows.append(row)
        try:
            _one_cpu(msr, cpu, offer, value, action, row)
        except AgentError as e:
            row["error"] = str(e)
            if e.status in (Status.NOT_ROOT, Status.NO_DEVICE, Status.LOCKDOWN, Status.FAILED):
                raise  # the same on every CPU
            first_problem = first_problem or e
    if first_problem:
        raise first_problem
    if uncovered:
        raise AgentError(Status.NOT_COVERED, f"the kernel relies on {' and '.join(_names(uncovered))}, which the "
                                             f"hypervisor does not support (supported: {bit_names(offer.supported)})"
                                             f"; only {bit_names(value)} can be reported")
    return Status.OK


def _one_cpu(msr: Msr, cpu: int, offer: Offer, value: int, action: str, row: dict[str, object]) -> None:
    """action: 'check' (status: the register must hold `value`), 'plan' (dry run), 'write' (report)."""
    def read() -> int:
        raw = msr.read(cpu, offer.ctrl_msr)
        if raw is None:
            raise AgentError(Status.MISMATCH, f"CPU {cpu}: RDMSR {offer.ctrl_msr:#x} faulted although the "
                                              f"{offer.form} form enumerates it")
        return offer.in_use(raw)

    before = read()
    row["before"] = hex(before)
    if action == "plan":
        row["would_write"] = hex(value)
    elif action == "check" and before != value:
        raise AgentError(Status.MISMATCH, f"CPU {cpu}: MSR {offer.ctrl_msr:#x} holds {bit_names(before)}, the "
                                          f"kernel relies on {bit_names(value)}: run `report`")
    elif action == "write":
        msr.write(cpu, offer.ctrl_msr, value)
        after = read()
        row["after"] = hex(after)
        if after != value:
            raise AgentError(Status.MISMATCH, f"CPU {cpu}: wrote {value:#x} to MSR {offer.ctrl_msr:#x}, "
                                              f"read back {after:#x}")
