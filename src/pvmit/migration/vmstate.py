"""Capturing a paused vCPU's architectural state as JSON-ready data, and putting it into another vCPU."""

from __future__ import annotations

import base64
import ctypes as C
from typing import Any

from pvmit.kvm import abi
from pvmit.kvm.errors import KvmError
from pvmit.kvm.vcpu import REG_NAMES, Regs, Vcpu
from pvmit.migration.fields import checked, need, optional
from pvmit.migration.stream import StreamError
from pvmit.net.text import shorten

# MSRs carried with the vCPU (beyond those the interface core owns: IA32_SPEC_CTRL, IA32_ARCH_CAPABILITIES).
CARRIED_MSRS = (
    0x10,  # IA32_TSC: the guest's clock continues
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x1A0,  # IA32_MISC_ENABLE
    0x277,  # PAT
    0x2FF,  # MTRR default type
    *range(0x200, 0x210),  # variable-range MTRRs (base/mask pairs 0-7)
    0x250, 0x258, 0x259, *range(0x268, 0x270),  # fixed-range MTRRs
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000100, 0xC0000101, 0xC0000102,  # FS_BASE, GS_BASE, KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)
# Fixed-size state structures carried as they are: (name, structure, get ioctl, set ioctl)
STRUCTS = (
    ("xsave", abi.KvmXsave, abi.KVM_GET_XSAVE, abi.KVM_SET_XSAVE),
    ("xcrs", abi.KvmXcrs, abi.KVM_GET_XCRS, abi.KVM_SET_XCRS),
    ("debugregs", abi.KvmDebugregs, abi.KVM_GET_DEBUGREGS, abi.KVM_SET_DEBUGREGS),
    ("mp_state", abi.KvmMpState, abi.KVM_GET_MP_STATE, abi.KVM_SET_MP_STATE),
)


def _blob(obj: C.Structure) -> str:
    return base64.b64encode(bytes(obj)).decode()


def _unblob(text: Any, cls: type[C.Structure], what: str) -> C.Structure:
    if not isinstance(text, str) or len(text) > 4 * C.sizeof(cls):
        raise StreamError(f"CPUS section: {what} must be a base64 string of {C.sizeof(cls)} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise StreamError(f"CPUS section: {what} is not base64") from None
    if len(raw) != C.sizeof(cls):
        raise StreamError(f"CPUS section: {what} has {len(raw)} bytes, expected {C.sizeof(cls)}")
    return cls.from_buffer_copy(raw)


def capture(vcpu: Vcpu) -> dict[str, Any]:
    """The paused vCPU's state. MSRs this KVM does not have are left out (the destination sets what came)."""
    regs = vcpu.get_regs()
    msrs: dict[str, int] = {}
    remaining = list(CARRIED_MSRS)
    while remaining:  # one KVM_GET_MSRS for all; KVM stops at an MSR it lacks, which is skipped
        got = vcpu.get_msrs(remaining)
        msrs.update({f"{i:#x}": v for i, v in got.items()})
        remaining = remaining[len(got) + 1:]
    state = {
        "regs": {n: getattr(regs, n) for n in REG_NAMES},
        "sregs": _blob(vcpu.get_sregs()),
        "fpu": _blob(vcpu.get_fpu()),
        "events": _blob(vcpu.get_events()),
        "msrs": msrs,
    }
    for name, struct, get, _ in STRUCTS:
        try:
            state[name] = _blob(vcpu.get_state(struct, get))
        except KvmError:
            pass  # this KVM lacks the ioctl; nothing of the kind to carry
    return state


def restore(vcpu: Vcpu, state: Any) -> list[str]:
    """Load `state` into `vcpu`, every field checked before anything is set. Returns what this KVM would not take
    (MSRs, state structures): the destination refuses the guest if anything did not fit, rather than run it with
    part of its state missing."""
    if not isinstance(state, dict):
        raise StreamError("CPUS section: not a JSON object")
    need(state, "regs", dict, where="CPUS section")
    values = [need(state, f"regs.{n}", int, where="CPUS section", lo=0, hi=(1 << 64) - 1) for n in REG_NAMES]
    msrs = optional(state, "msrs", dict, {}, where="CPUS section")
    if len(msrs) > len(CARRIED_MSRS):
        raise StreamError(f"CPUS section: {len(msrs)} MSRs, more than the {len(CARRIED_MSRS)} a pvmit VMM carries")
    pairs = []
    for key, value in msrs.items():
        if not (key.startswith("0x") and 2 < len(key) <= 10 and all(c in "0123456789abcdefABCDEF" for c in key[2:])):
            raise StreamError(f"CPUS section: MSR index {shorten(key, 40)!r} is not 0x followed by up to 8 hex digits")
        v = checked(value, f"msrs[{key}]", int, where="CPUS section", lo=0, hi=(1 << 64) - 1)
        pairs.append((int(key, 16), v))
    sregs = _unblob(state.get("sregs"), abi.KvmSregs, "sregs")
    fpu = _unblob(state.get("fpu"), abi.KvmFpu, "fpu")
    events = _unblob(state.get("events"), abi.KvmVcpuEvents, "events")
    extra = [(name, _unblob(state[name], struct, name), put) for name, struct, _, put in STRUCTS if name in state]
    unknown = sorted(set(state) - {"regs", "sregs", "fpu", "events", "msrs"} - {n for n, *_ in STRUCTS})
    if unknown:  # state this VMM would silently drop: refuse rather than run the guest without it
        raise StreamError(f"CPUS section: unknown field {shorten(unknown[0], 40)!r}")
    vcpu.set_sregs(sregs)  # type: ignore[arg-type]
    vcpu.set_regs(Regs(*values))
    vcpu.set_fpu(fpu)  # type: ignore[arg-type]
    refused = []
    for name, value, put in extra:
        try:
            vcpu.set_state(put, value)
        except KvmError as e:
            refused.append(f"{name} ({e})")
    vcpu.set_events(events)  # type: ignore[arg-type]
    while pairs:  # one KVM_SET_MSRS for all; KVM stops at one it refuses, which is noted and skipped
        n = vcpu.set_msrs(dict(pairs))
        if n < len(pairs):
            refused.append(f"MSR {pairs[n][0]:#x}")
        pairs = pairs[n + 1:]
    return refused
