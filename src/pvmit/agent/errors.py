"""The agent's exit statuses, and the error that carries one. One table: --help, the README and `pvmit guest`
all print it from here."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_ROOT = 3
    NO_DEVICE = 4
    LOCKDOWN = 5
    NOT_OFFERED = 6
    WRITE_REFUSED = 7
    MISMATCH = 8
    KERNEL_UNKNOWN = 9
    NOT_COVERED = 10


STATUS_TEXT: dict[Status, str] = {
    Status.OK: "done: the CTRL register of every online CPU holds what the kernel relies on (or, with --dry-run, "
               "would be written)",
    Status.FAILED: "any other failure (the message says what)",
    Status.USAGE: "bad usage",
    Status.NOT_ROOT: "not root, or without CAP_SYS_RAWIO (the msr driver's devices need both)",
    Status.NO_DEVICE: "/dev/cpu/N/msr or CPUID is missing: modprobe msr (and cpuid)",
    Status.LOCKDOWN: "the kernel refuses MSR writes: lockdown (/sys/kernel/security/lockdown) or msr.allow_writes=off",
    Status.NOT_OFFERED: "the hypervisor offers no form of the interface",
    Status.WRITE_REFUSED: "a CPU refused the write (WRMSR raised #GP: a bit the hypervisor does not support)",
    Status.MISMATCH: "a CPU's CTRL register does not hold the value decided (read back after the write, or in status)",
    Status.KERNEL_UNKNOWN: "the running kernel's spectre_v2 state cannot be read",
    Status.NOT_COVERED: "the kernel relies on a mitigation whose bit the hypervisor does not support (the supported "
                        "part is still reported)",
}


def status_table() -> str:
    """The exit statuses as the lines --help and the README print."""
    return "\n".join(f"  {int(s):>2}  {STATUS_TEXT[s]}" for s in Status)


class AgentError(Exception):
    """A failure with the exit status that names it; the message says what to do."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
