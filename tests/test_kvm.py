"""The KVM backend on the real /dev/kvm: handles, typed exits, errors, and the test guest in every form.

Skipped, with the reason, where /dev/kvm cannot be used.
"""

from __future__ import annotations

import json
import os

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.guest import program
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import OperatorSettings
from pvmit.kvm import abi
from pvmit.kvm.errors import KvmError
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.kvm.vcpu import HltExit, IoExit, MsrExit
from pvmit.kvm.vm import GuestMemory, MsrRange, Vm
from pvmit.vmm.hosts import stand_in, this_machine
from pvmit.vmm.machine import Machine, enter_long_mode
from pvmit.vmm.personality import resolve
from pvmit.vmm.runner import run_guest

USABLE, WHY = kvm_available()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
R, B = Mitigation.RETPOLINE, Mitigation.BHB_SHORT


@pytest.fixture(scope="module")
def kvm():  # type: ignore[no-untyped-def]
    with Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def real(catalog: Catalog):  # type: ignore[no-untyped-def]
    return this_machine(catalog)[0]


def test_system_handle(kvm: Kvm) -> None:
    assert kvm.api_version() == 12
    caps = kvm.capabilities()
    assert caps["KVM_CAP_X86_USER_SPACE_MSR"] and caps["KVM_CAP_X86_MSR_FILTER"]
    cpuid = kvm.supported_cpuid()
    assert any(e.function == 0 for e in cpuid) and any(e.function == 7 for e in cpuid)
    assert 0x10A in kvm.msr_feature_index_list()


def test_errors_name_the_ioctl_and_errno(kvm: Kvm) -> None:
    with Vm(kvm) as vm:
        bad = GuestMemory(4096)
        with pytest.raises(KvmError, match=r"KVM_SET_USER_MEMORY_REGION failed: EINVAL"):
            vm.add_memory(0, 0x123, bad)  # guest-physical address not page aligned
        with pytest.raises(ValueError, match="at most 16"):
            vm.set_msr_filter([MsrRange(i) for i in range(17)])


def test_handles_close_their_fds(kvm: Kvm) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        m = Machine(kvm)
        m.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_typed_exits_and_msr_filter(kvm: Kvm) -> None:
    from pvmit.asm import assemble

    m = Machine(kvm)
    try:
        m.vm.enable_cap(abi.KVM_CAP_X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
        m.vm.set_msr_filter([MsrRange(0x50000002)])
        code = assemble("mov dx, 0x3f8\nmov al, 0x4f\nout dx, al\nmov ecx, 0x50000002\nrdmsr\nmov rbx, rax\n"
                        "mov eax, 7\nxor edx, edx\nwrmsr\nhlt", 0x10000)
        m.load(code, 0x10000)
        enter_long_mode(m.vcpu, 0x10000, m.stack_top)
        m.vcpu.set_cpuid(kvm.supported_cpuid())
        x = m.vcpu.run()
        assert isinstance(x, IoExit) and x.out and x.port == 0x3F8 and bytes(m.vcpu.io_data(x)) == b"O"
        x = m.vcpu.run()
        assert isinstance(x, MsrExit) and not x.write and x.index == 0x50000002
        m.vcpu.complete_rdmsr(0x1234)
        x = m.vcpu.run()
        assert isinstance(x, MsrExit) and x.write and x.index == 0x50000002 and x.data == 7
        m.vcpu.complete_wrmsr()
        assert isinstance(m.vcpu.run(), HltExit)
        assert m.vcpu.get_regs().rbx == 0x1234
    finally:
        m.close()


def test_guest_program_disassembles_cleanly() -> None:
    """A second opinion on Keystone's output: iced-x86 decodes the code part of the guest, and the
    instructions that matter are where the source says."""
    import iced_x86

    code = program("mitigation_guest").code
    decoder = iced_x86.Decoder(64, code, ip=0x10000)
    formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    text = []
    for ins in decoder:
        if ins.code == iced_x86.Code.INVALID:
            break
        text.append(formatter.format(ins))
    joined = "\n".join(text)
    for needle in ("rdmsr", "wrmsr", "cpuid", "iretq", "lidt", "hlt", "out dx,al"):
        assert needle in joined, needle
    assert len(text) > 250


# (guest personality, host stand-in or None for this machine, what it uses, expected forced bits)
PAIRS = [
    ("icelake-server-v2", "sapphirerapids", {R}, 0x40),      # retpoline on an RRSBA host: RRSBA_DIS_S
    ("cascadelake-server-v2", "sapphirerapids", {B}, 0x400),  # short BHB loop on a long-history host: BHI_DIS_S
    ("icelake-server-v2", "icelake-sp", {R}, 0),              # retpoline effective on Ice Lake: nothing forced
    ("EPYC-Rome", None, {R}, 0),                              # AMD guest on this machine: nothing forced
    ("cascadelake-server-v2", "graniterapids", {R, B}, 0x440),
]


@pytest.mark.parametrize("form", list(Form))
@pytest.mark.parametrize("guest,host,uses,forced", PAIRS)
def test_guest_in_every_form(kvm: Kvm, catalog: Catalog, real, form: Form, guest: str, host: str | None,  # type: ignore[no-untyped-def]
                             uses: set[Mitigation], forced: int) -> None:
    h = stand_in(catalog, host, real) if host else real
    r = run_guest(kvm, resolve(catalog, guest), h, form, frozenset(uses))
    assert r.passed, (r.checks, r.transcript)
    assert f"guest: interface {form.value}" in "\n".join(r.transcript)
    assert r.spec_ctrl["forced_mask"] == f"{forced:#x}" and r.spec_ctrl["effective"] == f"{forced:#x}"
    if forced:
        assert r.spec_ctrl["intercepted"] and r.exits["spec_ctrl"] > 0  # type: ignore[operator]
    else:
        # the guest read and wrote IA32_SPEC_CTRL, and none of it left KVM
        assert "guest: ia32_spec_ctrl read 0x0" in r.transcript
        assert r.exits["spec_ctrl"] == 0 and not r.spec_ctrl["intercepted"]


def test_guest_cannot_clear_a_forced_bit(kvm: Kvm, catalog: Catalog, real) -> None:  # type: ignore[no-untyped-def]
    """The guest writes 0 to IA32_SPEC_CTRL: it reads 0 back, RRSBA_DIS_S stays in effect."""
    r = run_guest(kvm, resolve(catalog, "sapphirerapids"), stand_in(catalog, "sapphirerapids", real), Form.INTEL,
                  frozenset({R}), spec_ctrl_write=0)
    assert r.passed, r.checks
    assert "guest: ia32_spec_ctrl after write, read 0x0" in r.transcript
    assert r.spec_ctrl["guest_value"] == "0x0" and r.spec_ctrl["effective"] == "0x40"
    # this machine is not Intel: the control is kept as state and said to be modelled, not applied
    if real.real.vendor != "intel":
        assert r.spec_ctrl["modelled_only"] == ["RRSBA_DIS_S"] and r.spec_ctrl["in_hardware"] == []


def test_operator_force_on_is_applied(kvm: Kvm, catalog: Catalog, real) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(kvm, resolve(catalog, "EPYC-Milan"), real, Form.NEUTRAL, frozenset(),
                  OperatorSettings(force_on=2, unreported="trust"))
    assert r.passed, r.checks
    assert r.spec_ctrl["effective"] == "0x2" and r.spec_ctrl["intercepted"]


def test_unsupported_mitigation_fails_the_run(kvm: Kvm, catalog: Catalog, real) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(kvm, resolve(catalog, "icelake-server-v2"), stand_in(catalog, "cascadelake-sp", real),
                  Form.NEUTRAL, frozenset({R}))
    assert not r.passed
    failed = [c for c, ok, _ in r.checks if not ok]
    assert failed == ["the VMM can honour every mitigation the guest uses"]
    assert "guest: cannot report unsupported mitigations, wanted 0x2" in r.transcript


def test_cli_run(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("run", "--guest-cpu", "icelake-server-v2", "--host-cpu", "SapphireRapids", "--form", "kvm", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["passed"] and doc["spec_ctrl"]["forced_mask"] == "0x40" and doc["uses"] == ["retpoline"]
    r = cli("run", "--guest-cpu", "icelake-server-v2", "--host-cpu", "cascadelake-sp", "--form", "neutral")
    assert r.code == 1 and "FAIL the VMM can honour every mitigation" in r.stdout
    r = cli("run", "--guest-cpu", "no-such", "--form", "intel")
    assert r.code == 2 and "no CPU model named 'no-such'" in r.stderr


def test_cpuid_interface_leaves_reach_the_guest(kvm: Kvm, catalog: Catalog, real) -> None:  # type: ignore[no-untyped-def]
    from pvmit.vmm.vmm import Vmm

    vmm = Vmm(kvm, resolve(catalog, "EPYC-Rome"), real, InterfaceConfig(Form.NEUTRAL, 3))
    try:
        got = {(e.function, e.index): e for e in vmm.vcpu.get_cpuid()}
        assert got[(0x40000100, 0)].ebx == 0x74726956 and got[(0x40000101, 0)].ecx == 3
        assert got[(0, 0)].ebx == 0x68747541  # "Auth"
    finally:
        vmm.close()


def test_vcpu_state_round_trip_and_refusals(kvm: Kvm) -> None:
    """vmstate carries a vCPU into another VM; an MSR the destination KVM refuses is named, the rest still land."""
    import json as _json

    from pvmit.migration import vmstate

    a, b = Machine(kvm, 4 << 20), Machine(kvm, 4 << 20)
    try:
        enter_long_mode(a.vcpu, 0x10000, a.stack_top, (0x1111, 0x2222))
        a.vcpu.set_msrs({0xC0000102: 0xFFFF_8000_1234_0000, 0x174: 0x10})
        state = _json.loads(_json.dumps(vmstate.capture(a.vcpu)))
        assert {"xsave", "xcrs", "debugregs", "mp_state"} <= state.keys()
        msrs = dict(state["msrs"])
        state["msrs"] = {"0x174": msrs["0x174"], "0x12345": 1, "0xc0000102": msrs["0xc0000102"]}
        assert vmstate.restore(b.vcpu, state) == ["MSR 0x12345"]
        assert b.vcpu.get_msrs([0x174, 0xC0000102]) == {0x174: 0x10, 0xC0000102: 0xFFFF_8000_1234_0000}
        assert (b.vcpu.get_regs().rdi, b.vcpu.get_regs().rsi) == (0x1111, 0x2222)
        assert b.vcpu.get_sregs().cr3 == a.vcpu.get_sregs().cr3
    finally:
        a.close()
        b.close()
