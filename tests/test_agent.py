"""The guest agent: its decision against pvmit's model of Linux, discovery of every form against pvmit's own
hypervisor core (CPUID from `build_cpuid`, MSRs from `VmInterface`), every failure's exit status, the errno
mapping of the msr driver, and that it runs with the standard library and its own files only."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from pvmit.agent import msrdev, wire
from pvmit.agent.bundle import agent_files, install, unit_text
from pvmit.agent.cpuiddev import CPUID_STUB, InstructionCpuid
from pvmit.agent.decide import decide
from pvmit.agent.discover import discover, identify
from pvmit.agent.errors import STATUS_TEXT, AgentError, Status
from pvmit.agent.main import main
from pvmit.agent.run import Msr
from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.interface import forms
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.kvm.system import CpuidEntry
from pvmit.linux.model import Cmdline, predict
from pvmit.linux.spectre_v2 import Bhi, V2Mode
from pvmit.vmm.personality import build_cpuid, from_model
from pvmit.x86 import registers
from pvmit.x86.bits import ArchCapabilities, MitigationCtrl

RETPOLINE = "Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Retpoline"
EIBRS_LOOP = ("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; "
              "BHI: SW loop, KVM: SW loop")
LFENCE_LOOP = "Vulnerable: LFENCE; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: SW loop, KVM: SW loop"
BOTH = ("Mitigation: Enhanced / Automatic IBRS + Retpolines; IBPB: conditional; RSB filling; "
        "PBRSB-eIBRS: SW sequence; BHI: SW loop, KVM: SW loop")


# --- decide -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "bits", "assumed"), [
    (RETPOLINE, wire.RETPOLINE_S_USED, ()),
    (EIBRS_LOOP, wire.BHB_CLEAR_SEQ_S_USED, ()),
    (LFENCE_LOOP, wire.BHB_CLEAR_SEQ_S_USED, ()),
    (BOTH, wire.REQUEST_BITS, ()),
    ("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; "
     "BHI: BHI_DIS_S", 0, ()),
    ("Mitigation: Retpolines; IBPB: conditional; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; "
     "BHI: Vulnerable, KVM: SW loop", wire.RETPOLINE_S_USED, ()),
    ("Vulnerable; IBPB: disabled; STIBP: disabled; PBRSB-eIBRS: Not affected; BHI: Vulnerable", 0, ()),
    ("Mitigation: Full generic retpoline, IBPB: conditional, IBRS_FW, STIBP: disabled, RSB filling",
     wire.REQUEST_BITS, ("bhb-short",)),  # a 2019 kernel: no BHI field, which some newer lines leave out too
    ("Vulnerable: eIBRS with unprivileged eBPF", wire.BHB_CLEAR_SEQ_S_USED, ("bhb-short",)),  # bugs.c:3213
    ("Vulnerable: eIBRS+LFENCE with unprivileged eBPF and SMT", wire.BHB_CLEAR_SEQ_S_USED, ("bhb-short",)),
    ("Vulnerable: LFENCE", wire.BHB_CLEAR_SEQ_S_USED, ("bhb-short",)),  # 6.9-era kernels: no BHI field
    ("", wire.REQUEST_BITS, ("retpoline", "bhb-short")),
    ("Vulnerable: something new", wire.REQUEST_BITS, ("retpoline", "bhb-short")),
    ("Not affected", 0, ()),
    ("Mitigation: Something New; BHI: Long loop", wire.REQUEST_BITS, ("retpoline", "bhb-short")),
])
def test_decide(line: str, bits: int, assumed: tuple[str, ...]) -> None:
    r = decide(line, "quiet spectre_v2=retpoline")
    assert r.bits == bits and r.assumed == assumed
    assert r.reasons[0] == "command line: spectre_v2=retpoline"


def test_decide_agrees_with_pvmits_model_of_linux(catalog: Catalog) -> None:
    """One rule: what the agent reads off a kernel's line is what pvmit's model says that kernel relies on."""
    lines = {"RETPOLINE": "BHI: Retpoline", "SW_LOOP": "BHI: SW loop, KVM: SW loop"}
    checked = 0
    for m in catalog:
        for cmd in ("", "spectre_v2=retpoline", "spectre_v2=eibrs,retpoline", "spectre_v2=retpoline,lfence",
                    "spectre_bhi=off", "spectre_v2=off", "spectre_bhi=vmexit"):
            p = predict(m.facts, Cmdline.parse(cmd))
            line = f"{p.sysfs_mode}; STIBP: disabled; {lines.get(p.bhi.name, p.sysfs_bhi)}"
            got = decide(line, cmd)
            assert set(got.relies_on) == {x.value for x in p.relies_on}, (m.id, cmd, line)
            checked += 1
    assert checked > 200


def test_request_bits_are_the_interfaces() -> None:
    assert wire.RETPOLINE_S_USED == MitigationCtrl.RETPOLINE_S_USED == Mitigation.RETPOLINE.request_bit
    assert wire.BHB_CLEAR_SEQ_S_USED == MitigationCtrl.BHB_CLEAR_SEQ_S_USED == Mitigation.BHB_SHORT.request_bit
    assert set(decide(BOTH).relies_on) == {m.value for m in Mitigation}


def test_wire_constants_match_the_hypervisor_side() -> None:
    assert wire.MSR_IA32_ARCH_CAPABILITIES == registers.MSR_IA32_ARCH_CAPABILITIES
    assert wire.ARCH_CAP_VIRTUAL_ENUM == ArchCapabilities.VIRTUAL_ENUM
    assert (wire.MSR_VIRTUAL_ENUMERATION, wire.MSR_VIRTUAL_MITIGATION_ENUM, wire.MSR_VIRTUAL_MITIGATION_CTRL) == (
        registers.MSR_VIRTUAL_ENUMERATION, registers.MSR_VIRTUAL_MITIGATION_ENUM,
        registers.MSR_VIRTUAL_MITIGATION_CTRL)
    assert wire.KVM_SIGNATURE == registers.KVM_SIGNATURE
    assert wire.KVM_FEATURE_PVMIT_MITIGATION == 1 << forms.KVM_FEATURE_PVMIT_MITIGATION_BIT
    assert wire.MSR_KVM_PVMIT_MITIGATION == forms.MSR_KVM_PVMIT_MITIGATION
    assert wire.NEUTRAL_SIGNATURE == forms.NEUTRAL_SIGNATURE
    assert forms.NEUTRAL_DEFAULT_BASE in wire.HYPERVISOR_BASES


# --- a fake guest backed by pvmit's own hypervisor core -------------------------------------------------------------

HV_LEAF1 = CpuidEntry(1, 0, 0, 0, 0, wire.CPUID_1_ECX_HYPERVISOR, 0)


def cpuid_from(entries: list[CpuidEntry]):  # type: ignore[no-untyped-def]
    table = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries}

    def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        return table.get((leaf, sub if leaf in (7, 0xD) else 0), (0, 0, 0, 0))

    return cpuid


class VmMsr:
    """The msr driver of a guest whose hypervisor is pvmit's core; per-CPU quirks for failure tests."""

    def __init__(self, vm: VmInterface, refuse_on: int | None = None, ignore_writes: bool = False,
                 write_error: AgentError | None = None) -> None:
        self.vm, self.refuse_on, self.ignore, self.write_error = vm, refuse_on, ignore_writes, write_error
        self.writes: list[tuple[int, int, int]] = []

    def read(self, cpu: int, index: int) -> int | None:
        return self.vm.rdmsr(cpu, index)

    def write(self, cpu: int, index: int, value: int) -> None:
        if self.write_error:
            raise self.write_error
        self.writes.append((cpu, index, value))
        if self.ignore:
            return
        if cpu == self.refuse_on or not self.vm.wrmsr(cpu, index, value):
            raise msrdev.write_faulted(cpu, index, value)


@dataclass
class FakeGuest:
    """A Linux guest as the agent sees it."""

    spectre_v2: str | None = RETPOLINE
    cmdline: str = "console=ttyS0"
    uid: int = 0
    cpus: list[int] = field(default_factory=lambda: [0, 1, 2])
    cpuid_fn: object = None
    msr_dev: object = None
    lockdown_mode: str | None = "none"
    allow: str | None = "default"
    msr_missing: bool = False

    def euid(self) -> int:
        return self.uid

    def release(self) -> str:
        return "6.1.0-test"

    def read(self, path: str) -> str | None:
        return {"/sys/devices/system/cpu/vulnerabilities/spectre_v2": self.spectre_v2,
                "/proc/cmdline": self.cmdline}.get(path)

    def cpuid(self):  # type: ignore[no-untyped-def]
        return self.cpuid_fn, "fake"

    def msr(self) -> Msr:
        if self.msr_missing:
            raise AgentError(Status.NO_DEVICE, "/dev/cpu/0/msr does not exist: the msr module is not loaded")
        return self.msr_dev  # type: ignore[return-value]

    def online_cpus(self) -> list[int]:
        return self.cpus

    def lockdown(self) -> str | None:
        return self.lockdown_mode

    def allow_writes(self) -> str | None:
        return self.allow


def guest_on(catalog: Catalog, form: Form | None, supported: int = 3, *, model: str = "icelake-sp",
             neutral_base: int = forms.NEUTRAL_DEFAULT_BASE, **kw: object) -> tuple[FakeGuest, VmInterface]:
    p = from_model(catalog, model)
    config = InterfaceConfig(form or Form.NEUTRAL, supported, neutral_base=neutral_base)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, p.facts, vcpus=3)
    entries = build_cpuid(p, config if form else None, [HV_LEAF1])
    if form is None:  # no interface: also no interface MSRs
        vm = VmInterface(InterfaceConfig(Form.KVM, 0), catalog.get("sapphirerapids").facts, p.facts, vcpus=3)
    msr_kw = {k: kw.pop(k) for k in ("refuse_on", "ignore_writes", "write_error") if k in kw}
    g = FakeGuest(cpuid_fn=cpuid_from(entries), msr_dev=VmMsr(vm, **msr_kw), **kw)  # type: ignore[arg-type]
    return g, vm


def agent(g: FakeGuest, *argv: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--json"], machine=g, out=out, err=err)
    doc = json.loads(out.getvalue())
    assert doc["outcome"]["status"] == code
    return code, doc, err.getvalue()


@pytest.mark.parametrize("form", list(Form))
def test_report_on_every_form(catalog: Catalog, form: Form) -> None:
    g, vm = guest_on(catalog, form, spectre_v2=BOTH)
    assert vm.reliance() is None
    code, doc, err = agent(g, "status")
    assert code == Status.MISMATCH and "run `report`" in err  # nothing reported yet
    code, doc, err = agent(g, "report")
    assert code == Status.OK, err
    assert doc["interface"]["chosen"]["form"] == form.value
    assert doc["request"]["value"] == "0x3"
    assert [c["after"] for c in doc["cpus"]] == ["0x3"] * 3
    assert vm.reliance() == {Mitigation.RETPOLINE, Mitigation.BHB_SHORT}
    assert all(v.reported for v in vm.vcpus)
    code, doc, _ = agent(g, "status")
    assert code == Status.OK and [c["before"] for c in doc["cpus"]] == ["0x3"] * 3


def test_relying_on_nothing_is_reported_too(catalog: Catalog) -> None:
    """Writing 0 tells the hypervisor the guest reported (and needs nothing): `unreported` policies stop applying."""
    g, vm = guest_on(catalog, Form.INTEL, spectre_v2="Mitigation: Enhanced / Automatic IBRS; BHI: BHI_DIS_S")
    code, doc, _ = agent(g, "report")
    assert code == Status.OK and doc["request"]["value"] == "0x0"
    assert vm.reliance() == frozenset() and all(v.reported for v in vm.vcpus)


def test_dry_run_writes_nothing(catalog: Catalog) -> None:
    g, vm = guest_on(catalog, Form.KVM)
    code, doc, _ = agent(g, "report", "--dry-run")
    assert code == Status.OK and doc["dry_run"] is True
    assert [c["would_write"] for c in doc["cpus"]] == ["0x2"] * 3
    assert g.msr_dev.writes == [] and vm.reliance() is None  # type: ignore[attr-defined]


def test_neutral_form_anywhere_in_the_hypervisor_range(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.NEUTRAL, neutral_base=0x4000F000)
    code, doc, _ = agent(g, "report")
    assert code == Status.OK and "0x4000f000" in doc["interface"]["chosen"]["how"]
    assert "kvm: KVM leaves at 0x40000000, feature bit 30 clear in 0x40000001.EAX=0x0" in doc["interface"]["probes"]


def test_amd_guest_on_the_intel_form(catalog: Catalog) -> None:
    """Form (a) for an AMD guest: the VMM emulates IA32_ARCH_CAPABILITIES bit 63 (docs/interface.md)."""
    g, vm = guest_on(catalog, Form.INTEL, model="epyc-rome")
    code, doc, _ = agent(g, "report")
    assert code == Status.OK and doc["cpu"]["vendor"] == "AuthenticAMD"
    assert vm.reliance() == {Mitigation.RETPOLINE}


def test_not_offered(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, None, model="epyc-rome")
    code, doc, err = agent(g, "report")
    assert code == Status.NOT_OFFERED and "offers no form" in err
    assert doc["decision"]["relies_on"] == ["retpoline"]  # what was learned before the failure is kept
    probes = doc["interface"]["probes"]
    assert any(p.startswith("intel: CPUID.(7,0).EDX[29] clear") for p in probes)
    assert "kvm: no KVMKVMKVM signature leaf" in probes
    assert "neutral: no VirtMitigCtl signature leaf" in probes


def test_no_hypervisor_bit_means_no_hypervisor_leaves() -> None:
    sig = (0x40000001, *[int.from_bytes(wire.NEUTRAL_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)])
    table = {0x40000000: sig, 0x40000001: (1, wire.MSR_VIRTUAL_MITIGATION_CTRL, 3, 0)}

    def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        return table.get(leaf, (0, 0, 0, 0))  # type: ignore[return-value]

    assert discover(cpuid, lambda i: None).chosen is None  # bare metal: leaves 0x4... are junk there
    table[1] = (0, 0, wire.CPUID_1_ECX_HYPERVISOR, 0)
    found = discover(cpuid, lambda i: None).chosen
    assert found and found.form == "neutral" and found.supported == 3
    table[0x40000001] = (0, wire.MSR_VIRTUAL_MITIGATION_CTRL, 3, 0)  # version 0 is not the interface
    assert discover(cpuid, lambda i: None).chosen is None


def test_intel_form_needs_bit_63(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, None, model="cascadelake-sp")  # ARCH_CAPABILITIES shown, bit 63 clear
    code, doc, _ = agent(g, "status")
    assert code == Status.NOT_OFFERED
    assert any("bit 63 (VIRTUAL_ENUM) clear" in p for p in doc["interface"]["probes"])


def test_not_root(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL, uid=1000)
    code, doc, err = agent(g, "status")
    assert code == Status.NOT_ROOT and "root" in err and "decision" in doc


def test_msr_module_missing(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL, msr_missing=True)
    code, _, err = agent(g, "report")
    assert code == Status.NO_DEVICE and "msr module is not loaded" in err


def test_lockdown_refuses_the_write(catalog: Catalog) -> None:
    refusal = msrdev.write_refusal("integrity", "default")
    g, vm = guest_on(catalog, Form.INTEL, write_error=refusal)
    code, _, err = agent(g, "report")
    assert code == Status.LOCKDOWN and "locked down (integrity" in err and vm.reliance() is None
    g.lockdown_mode = "integrity"
    code, _, err = agent(g, "report", "--dry-run")  # a dry run says so too, before any write
    assert code == Status.LOCKDOWN and "dry run" in err


def test_msr_allow_writes_off(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL, allow="off")
    code, _, err = agent(g, "report", "--dry-run")
    assert code == Status.LOCKDOWN and "msr.allow_writes=off" in err


def test_a_cpu_refuses_the_write(catalog: Catalog) -> None:
    g, vm = guest_on(catalog, Form.NEUTRAL, refuse_on=1)
    code, doc, err = agent(g, "report")
    assert code == Status.WRITE_REFUSED and "CPU 1 refused" in err
    assert [("after" in c, "error" in c) for c in doc["cpus"]] == [(True, False), (False, True), (True, False)]


def test_read_back_mismatch(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL, ignore_writes=True)
    code, doc, err = agent(g, "report")
    assert code == Status.MISMATCH and "read back 0x0" in err


def test_kernel_state_unreadable(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL, spectre_v2=None)
    code, doc, err = agent(g, "report")
    assert code == Status.KERNEL_UNKNOWN and "spectre_v2" in err and "decision" not in doc


def test_unsupported_bit_is_not_covered(catalog: Catalog) -> None:
    g, vm = guest_on(catalog, Form.KVM, supported=int(MitigationCtrl.BHB_CLEAR_SEQ_S_USED), spectre_v2=BOTH)
    code, doc, err = agent(g, "report")
    assert code == Status.NOT_COVERED and "relies on retpoline" in err
    assert doc["request"] == {"value": "0x1", "bits": "BHB_CLEAR_SEQ_S_USED", "relies_on_unsupported": ["retpoline"]}
    assert vm.reliance() == {Mitigation.BHB_SHORT}  # the supported part was reported


def test_text_output(catalog: Catalog) -> None:
    g, _ = guest_on(catalog, Form.INTEL)
    out, err = io.StringIO(), io.StringIO()
    assert main(["report"], machine=g, out=out, err=err) == 0
    text = out.getvalue()
    assert "relies on  retpoline" in text and "intel form: CTRL MSR 0x50000002" in text
    assert "cpu 2      holds 0x0, wrote, read back 0x2" in text
    assert "reported to the hypervisor" in err.getvalue()


def test_usage_errors_exit_2() -> None:
    err = io.StringIO()
    assert main(["bogus"], err=err) == 2
    assert main(["report", "--frobnicate"], err=err) == 2


def test_identify_reads_what_pvmits_model_needs(catalog: Catalog) -> None:
    p = from_model(catalog, "cascadelake-sp")
    ident = identify(cpuid_from(build_cpuid(p, None, [HV_LEAF1])))
    assert (ident["vendor"], ident["family"], ident["model"]) == ("GenuineIntel", 6, 0x55)
    assert ident["hypervisor"] is True
    assert int(str(ident["cpuid_7_0_edx"]), 16) == p.facts.reg("cpuid_7_0_edx").value


# --- the real devices' error mapping (os calls replaced) ------------------------------------------------------------

def _raise(code: int):  # type: ignore[no-untyped-def]
    def f(*a: object) -> None:
        raise OSError(code, os.strerror(code))
    return f


@pytest.mark.parametrize(("code", "status"), [(errno.ENOENT, Status.NO_DEVICE), (errno.EACCES, Status.NOT_ROOT),
                                              (errno.EPERM, Status.NOT_ROOT), (errno.ENXIO, Status.FAILED)])
def test_msr_open_errors(monkeypatch: pytest.MonkeyPatch, code: int, status: Status) -> None:
    monkeypatch.setattr(msrdev.os, "open", _raise(code))
    with pytest.raises(AgentError) as e:
        msrdev.MsrDevices().read(0, 0x10A)
    assert e.value.status is status


def test_msr_rw_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "msr").write_bytes(b"")
    dev = msrdev.MsrDevices(str(tmp_path))
    dev.write(0, 0x50000002, 2)  # a sparse file stands in for the device: offset = MSR index
    assert dev.read(0, 0x50000002) == 2
    monkeypatch.setattr(msrdev.os, "pread", _raise(errno.EIO))
    assert dev.read(0, 0x10A) is None  # RDMSR faulted: the MSR does not exist
    monkeypatch.setattr(msrdev.os, "pwrite", _raise(errno.EIO))
    with pytest.raises(AgentError) as e:
        dev.write(0, 0x50000002, 4)
    assert e.value.status is Status.WRITE_REFUSED
    monkeypatch.setattr(msrdev.os, "pwrite", _raise(errno.EPERM))
    monkeypatch.setattr(msrdev, "lockdown_state", lambda: "confidentiality")
    with pytest.raises(AgentError) as e:
        dev.write(0, 0x50000002, 2)
    assert e.value.status is Status.LOCKDOWN and "confidentiality" in str(e.value)
    dev.close()


def test_lockdown_and_cpu_list_parsing(tmp_path: Path) -> None:
    f = tmp_path / "lockdown"
    f.write_text("none [integrity] confidentiality\n")
    assert msrdev.lockdown_state(f) == "integrity"
    f.write_text("[none] integrity confidentiality\n")
    assert msrdev.lockdown_state(f) == "none"
    assert msrdev.lockdown_state(tmp_path / "absent") is None
    assert msrdev.parse_cpu_list("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert msrdev.parse_cpu_list("0") == [0]


# --- CPUID stub, bundle, unit, CLI ----------------------------------------------------------------------------------

def test_cpuid_stub_is_the_assembled_host_stub() -> None:
    from pvmit.asm import assemble, package_source
    assert CPUID_STUB == assemble(package_source("pvmit.host", "cpuid_stub.s"), name="cpuid_stub.s")


def test_cpuid_stub_runs() -> None:
    from pvmit.host.cpuid import InstructionCpuid as HostCpuid
    assert InstructionCpuid()(0) == HostCpuid()(0)


def test_agent_runs_with_the_standard_library_and_its_own_files(tmp_path: Path) -> None:
    """Isolated interpreter, only the bundle on the path: every module loaded is the stdlib's or the bundle's."""
    for rel, data in agent_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1])\n"
        "from pvmit.agent.main import main\n"
        "code = main(['report', '--dry-run', '--json'])\n"
        "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
        "print(json.dumps({'code': code, 'files': [f for f in files if f]}), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    doc = json.loads(p.stdout)
    assert doc["schema"] == "pvmit.guest-agent/1" and doc["decision"]["relies_on"] is not None
    last = json.loads(p.stderr.strip().splitlines()[-1])
    assert last["code"] in {int(s) for s in Status}
    stdlib = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
    strays = [f for f in last["files"] if not f.startswith((str(tmp_path), *stdlib))]
    assert strays == []


def test_unit_file() -> None:
    text = unit_text()
    for line in ("Type=oneshot", "RemainAfterExit=yes", "After=systemd-modules-load.service",
                 "ExecStartPre=/sbin/modprobe msr", "ExecStart=/usr/bin/python3 -m pvmit.agent report",
                 "Environment=PYTHONPATH=/usr/local/lib/pvmit-agent", "WantedBy=multi-user.target"):
        assert line in text.splitlines()


def test_install(tmp_path: Path) -> None:
    written = install(tmp_path)
    assert tmp_path / "etc/systemd/system/pvmit-guest-agent.service" in written
    assert (tmp_path / "usr/local/lib/pvmit-agent/pvmit/linux/spectre_v2.py").exists()
    assert not (tmp_path / "usr/local/lib/pvmit-agent/pvmit/linux/model.py").exists()


def test_every_exit_status_is_documented(cli) -> None:  # type: ignore[no-untyped-def]
    readme = (REPO / "README.md").read_text()
    r = cli("guest", "report", "--help")
    assert r.code == 0
    for s in Status:
        assert f"| {int(s)} | {STATUS_TEXT[s]} |" in readme, s
        assert f"{int(s):>2}  {STATUS_TEXT[s]}" in r.stdout


def test_pvmit_guest_cli(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("guest", "status", "--json")
    doc = json.loads(r.stdout)  # one document, whatever this machine offers
    assert doc["outcome"]["status"] == r.code and r.code in {int(s) for s in Status}
    if r.code:
        assert r.stderr.startswith("pvmit-agent: error: ")
    r = cli("guest", "install", "--root", str(tmp_path), "--json")
    assert r.code == 0 and len(json.loads(r.stdout)["written"]) == len(agent_files()) + 1
    r = cli("guest", "install", "--root", "/proc/no/such", "--json")
    assert r.code == 1 and r.stdout == "" and "cannot install" in r.stderr


def test_mode_and_bhi_are_reported(catalog: Catalog) -> None:
    r = decide(EIBRS_LOOP)
    assert (r.mode, r.bhi) == (V2Mode.EIBRS, Bhi.SW_LOOP)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    import shutil
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: cannot check the unit file with systemd")
    unit = tmp_path / "pvmit-guest-agent.service"
    unit.write_text(unit_text())
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "pvmit-guest-agent" not in p.stderr, p.stderr
