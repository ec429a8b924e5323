"""pvmit's libvirt core without libvirt: the feature mapping, CPU map files, XML, facts, the metadata record, the
guest agent's protocol, the verdict, the hook and its installation. (tests/test_libvirt_real.py runs real libvirt.)

XML fixtures in tests/fixtures/libvirt/ were written by libvirt 9.0 (Debian 12) on this machine kind; the Intel
host below is written by hand in libvirt's format, since no Intel host is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation, bhb_short_effective, retpoline_effective
from pvmit.libvirt import agent as qga
from pvmit.libvirt.config import ConfigError, HookConfig, load_config, parse_config, render_config
from pvmit.libvirt.cpumap import DEFAULT_DIR, CpuMapError, FileCpuMap
from pvmit.libvirt.facts import Unknowable, guest_personality, host_facts
from pvmit.libvirt.features import facts_from_features, feature_map, parse_feature_map
from pvmit.libvirt.hook import decide
from pvmit.libvirt.install import HOOK_DIR, install
from pvmit.libvirt.parse import XmlError, domain, host_cpu
from pvmit.libvirt.record import NAMESPACE, GuestReading, Record, format_record, parse_record
from pvmit.libvirt.verdict import judge
from pvmit.linux.model import predict
from pvmit.x86.feature_names import parse_feature_names
from pvmit.x86.registers import REGISTERS

FIXTURES = Path(__file__).parent / "fixtures" / "libvirt"
REPO = Path(__file__).resolve().parent.parent
HAVE_CPU_MAP = (DEFAULT_DIR / "x86_features.xml").exists()
needs_cpu_map = pytest.mark.skipif(not HAVE_CPU_MAP, reason=f"libvirt's CPU map is not installed ({DEFAULT_DIR}; "
                                                            "Debian: libvirt-daemon)")

INTEL_CAPS = """<capabilities><host><uuid>00000000-0000-0000-0000-000000000001</uuid><cpu>
  <arch>x86_64</arch><model>Cascadelake-Server</model><vendor>Intel</vendor>
  <microcode version='83898371'/><signature family='6' model='85' stepping='7'/>
  <feature name='arch-capabilities'/><feature name='rdctl-no'/><feature name='ibrs-all'/>
  <feature name='skip-l1dfl-vmentry'/><feature name='mds-no'/><feature name='pschange-mc-no'/>
  <feature name='tsx-ctrl'/><feature name='stibp'/><feature name='md-clear'/></cpu></host></capabilities>"""
"""A Cascade Lake host as libvirt 9.0 lists one (model plus the features beyond it), written by hand."""


def _map_dir(tmp: Path, models: dict[str, str], features: str = "") -> Path:
    (tmp / "x86_features.xml").write_text(f"<cpus>{features or FEATURES}</cpus>")
    for name, body in models.items():
        (tmp / f"x86_{name}.xml").write_text(f"<cpus><model name='{name}'>{body}</model></cpus>")
    return tmp


FEATURES = ("<feature name='spec-ctrl'/><feature name='ssbd'/><feature name='arch-capabilities'>"
            "<alias name='arch_capabilities' source='linux'/></feature><feature name='ibrs-all'/>"
            "<feature name='rsba'/><feature name='fpu'/>")


# --- the mapping ----------------------------------------------------------------------------------------------

def test_every_mapped_bit_exists_and_every_source_is_defined() -> None:
    fm = feature_map()
    assert len(fm.features) > 40
    for f in fm.features:
        assert f.register.bit(f.bit) == f.mask and f.source.partition(":")[0] in fm.sources


@needs_cpu_map
def test_the_mapping_agrees_with_the_installed_cpu_map() -> None:
    """Each name libvirt's x86_features.xml defines is at the same leaf, subleaf, register and bit (or MSR and bit)
    as the pvmit register the mapping puts it in; libvirt's aliases are the mapping's."""
    root = ET.parse(DEFAULT_DIR / "x86_features.xml").getroot()
    checked = 0
    for el in root.iter("feature"):
        f = feature_map().get(el.get("name", ""))
        if f is None:
            continue
        reg, checked = f.register, checked + 1
        cpuid, msr = el.find("cpuid"), el.find("msr")
        if reg.kind == "cpuid":
            assert cpuid is not None, f.name
            assert int(cpuid.get("eax_in", "0"), 16) == reg.index and int(cpuid.get("ecx_in", "0"), 16) == \
                reg.subleaf, f.name
            assert int(cpuid.get(reg.out, "0"), 16) == f.mask, f.name
        else:
            assert msr is not None and int(msr.get("index", "0"), 16) == reg.index, f.name
            assert int(msr.get("eax", "0"), 16) | int(msr.get("edx", "0"), 16) << 32 == f.mask, f.name
        assert {a.get("name") for a in el.findall("alias")} <= {f.name, *f.aliases}, f.name
    assert checked >= 20


@pytest.mark.parametrize("change, message", [
    (lambda d: d["feature"][0].update(register="cpuid_1_ecx"), "register"),
    (lambda d: d["feature"][0].update(bit="NOPE"), "NOPE"),
    (lambda d: d["feature"][1].update(name=d["feature"][0]["name"]), "already used"),
    (lambda d: d["feature"][0].update(source="nowhere: x"), "does not start with a key"),
    (lambda d: d["feature"][1].update(register=d["feature"][0]["register"], bit=d["feature"][0]["bit"]),
     "more than one feature"),
])
def test_a_wrong_mapping_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    doc = tomllib.loads((REPO / "src/pvmit/x86/data/feature_names.toml").read_text())
    change(doc)
    with pytest.raises(ValueError, match=message):
        parse_feature_names(doc, "test")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tcg"].update(hidden=["cpuid_1_ecx"]), "hidden must list register keys"),
    (lambda d: d["tcg"].update(source="nowhere: x"), "does not start with a key"),
    (lambda d: d["sources"].update(qemu="another QEMU"), "already means something else"),
    (lambda d: d.update(feature=[]), "names are in the shared table"),
])
def test_a_wrong_tcg_section_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    doc = tomllib.loads((REPO / "src/pvmit/libvirt/data/tcg.toml").read_text())
    assert parse_feature_map(doc, "test").tcg_hidden == feature_map().tcg_hidden
    change(doc)
    with pytest.raises(ValueError, match=message):
        parse_feature_map(doc, "test")


def _facts(listed: list[str], known: set[str], host: bool = True, tcg: bool = False):  # type: ignore[no-untyped-def]
    return facts_from_features(listed, known.__contains__, vendor="intel", family=6, model=85, stepping=7,
                               where="test", host=host, tcg=tcg)


def test_listed_known_and_unknown_names() -> None:
    f = _facts(["spec-ctrl", "arch-capabilities", "ibrs-all"], {"spec-ctrl", "ssbd", "arch-capabilities",
                                                                "ibrs-all", "rsba"})
    assert f.fact("cpuid_7_0_edx", "SPEC_CTRL").value is True
    assert f.fact("cpuid_7_0_edx", "SPEC_CTRL_SSBD").value is False  # known name, not listed
    assert f.fact("arch_capabilities", "RSBA").value is False
    assert f.fact("arch_capabilities", "RRSBA").value is None  # no libvirt or QEMU name: never 0
    assert f.fact("cpuid_7_2_edx", "BHI_CTRL").value is None  # a name this libvirt does not know


def test_arch_capabilities_follows_its_enumeration() -> None:
    known = {"arch-capabilities", "rsba", "ibrs-all"}
    absent = _facts([], known)
    assert absent.reg("arch_capabilities").known == REGISTERS["arch_capabilities"].mask  # no MSR: all 0
    unread = _facts(["arch-capabilities"], known)  # listed, but no bit: libvirt could not read the MSR
    assert unread.reg("arch_capabilities").known == 0
    shown_empty = _facts(["arch-capabilities"], known, host=False)  # a guest shown the MSR with nothing set
    assert shown_empty.fact("arch_capabilities", "RSBA").value is False


def test_tcg_guests_are_shown_no_speculation_bits() -> None:
    f = _facts(["spec-ctrl", "arch-capabilities", "ibrs-all"], {"spec-ctrl", "arch-capabilities", "ibrs-all"},
               host=False, tcg=True)
    for key in feature_map().tcg_hidden:
        assert f.reg(key).value == 0 and f.reg(key).known == REGISTERS[key].mask


# --- libvirt's CPU map files ----------------------------------------------------------------------------------

def test_cpu_map_files(tmp_path: Path) -> None:
    d = _map_dir(tmp_path, {
        "Base": "<signature family='6' model='85' stepping='5-7'/><vendor name='Intel'/><feature name='fpu'/>",
        "Child": "<model name='Base'/><feature name='spec-ctrl'/><feature name='ssbd' removed='yes'/>"})
    m = FileCpuMap(d)
    child = m.model("Child")
    assert child is not None and child.features == {"fpu", "spec-ctrl"} and child.vendor == "intel"
    assert child.signature == (6, 85, 5) and m.model("Nope") is None
    assert m.knows("arch_capabilities") and m.knows("arch-capabilities") and not m.knows("bhi-ctrl")


def test_cpu_map_errors(tmp_path: Path) -> None:
    with pytest.raises(CpuMapError, match="cannot read"):
        FileCpuMap(tmp_path / "none")
    loop = _map_dir(tmp_path, {"A": "<model name='B'/>", "B": "<model name='A'/>"})
    with pytest.raises(CpuMapError, match="based on itself"):
        FileCpuMap(loop).model("A")


@needs_cpu_map
def test_installed_cpu_map_reads() -> None:
    m = FileCpuMap()
    casc = m.model("Cascadelake-Server")
    assert casc is not None and {"spec-ctrl", "ssbd"} <= casc.features and casc.signature == (6, 85, 5)


# --- XML ------------------------------------------------------------------------------------------------------

def test_capabilities_of_a_real_daemon() -> None:
    cpu = host_cpu((FIXTURES / "capabilities-amd-zen5-vm.xml").read_text())
    assert (cpu.vendor, cpu.family, cpu.model_number, cpu.stepping) == ("AMD", 26, 2, 1)
    assert cpu.model == "kvm64" and "hypervisor" in cpu.features and "<cpu>" in cpu.xml


def test_bad_xml_is_named() -> None:
    with pytest.raises(XmlError, match="not valid XML"):
        domain("<domain><name>x</name>")
    with pytest.raises(XmlError, match="no <name>"):
        domain("<domain/>")
    with pytest.raises(XmlError, match="no <host><cpu>"):
        host_cpu("<capabilities/>")
    with pytest.raises(XmlError, match="more than"):
        domain("<domain>" + " " * (16 << 20) + "</domain>")


def test_domain_cpu_modes() -> None:
    live = domain((FIXTURES / "live-cooperlake-tcg.xml").read_text())
    assert live.virt_type == "qemu" and live.cpu.model == "Cooperlake" and "ibrs-all" in live.cpu.with_policy(
        "disable")
    assert domain("<domain><name>d</name></domain>").cpu.mode == "default"
    pt = domain("<domain type='kvm'><name>d</name><cpu mode='host-passthrough'/></domain>")
    assert pt.cpu.mode == "host-passthrough" and pt.cpu.model is None


# --- facts ----------------------------------------------------------------------------------------------------

@needs_cpu_map
def test_an_intel_host_from_capabilities_is_completed_from_the_catalog(catalog: Catalog) -> None:
    cpu = host_cpu(INTEL_CAPS)
    m = FileCpuMap()
    model = m.model("Cascadelake-Server")
    assert model is not None
    facts, notes = host_facts(cpu, model.features | set(cpu.features), m, catalog, "caps")
    ibrs = facts.fact("arch_capabilities", "IBRS_ALL")
    assert ibrs.value is True and "'ibrs-all' listed" in ibrs.source
    rrsba = facts.fact("arch_capabilities", "RRSBA")  # libvirt cannot name it: the catalog's, cited
    assert rrsba.value is True and rrsba.source.startswith("catalog cascadelake-sp")
    assert any("RRSBA" in n for n in notes)
    assert not retpoline_effective(facts).answer and bhb_short_effective(facts).answer  # as for the catalog model


@needs_cpu_map
def test_a_host_the_catalog_does_not_know_keeps_its_unknowns(catalog: Catalog) -> None:
    cpu = host_cpu(INTEL_CAPS.replace("model='85' stepping='7'", "model='58' stepping='9'"))  # Ivy Bridge
    facts, _ = host_facts(cpu, frozenset(cpu.features) | {"spec-ctrl"}, FileCpuMap(), catalog, "caps")
    assert facts.fact("arch_capabilities", "RRSBA").value is None
    assert retpoline_effective(facts).assumed  # decided conservatively, and said so


def test_host_vendor_must_be_x86(catalog: Catalog, tmp_path: Path) -> None:
    cpu = host_cpu(INTEL_CAPS.replace("<vendor>Intel</vendor>", "<vendor>ARM</vendor>"))
    with pytest.raises(ValueError, match="vendor"):
        host_facts(cpu, frozenset(), FileCpuMap(_map_dir(tmp_path, {"X": "<feature name='fpu'/>"})), catalog, "c")


@needs_cpu_map
def test_guest_personalities(catalog: Catalog) -> None:
    m = FileCpuMap()

    def pers(cpu: str, kind: str = "kvm"):  # type: ignore[no-untyped-def]
        return guest_personality(domain(f"<domain type='{kind}'><name>g</name>{cpu}</domain>"), m, catalog)

    casc = pers("<cpu mode='custom'><model>Cascadelake-Server</model></cpu>")
    assert casc.facts.fact("cpuid_7_0_edx", "SPEC_CTRL").value is True
    assert casc.facts.reg("arch_capabilities").value == 0  # this model does not show the MSR
    assert (casc.facts.family, casc.facts.model) == (6, 0x55)
    cooper = pers("<cpu mode='custom'><model>Cooperlake</model></cpu>")
    assert predict(cooper.facts).mode.value == "eibrs"  # ibrs-all is part of libvirt's Cooperlake
    no_eibrs = pers("<cpu mode='custom'><model>Cooperlake</model><feature policy='disable' name='ibrs-all'/></cpu>")
    assert predict(no_eibrs.facts).mode.value != "eibrs"
    optional = pers("<cpu mode='custom'><model>Cascadelake-Server</model>"
                    "<feature policy='optional' name='arch-capabilities'/></cpu>")
    assert optional.facts.fact("cpuid_7_0_edx", "ARCH_CAPABILITIES").value is None
    tcg = pers("<cpu mode='custom'><model>Cooperlake</model></cpu>", "qemu")
    assert predict(tcg.facts).mode.value == "retpoline"
    assert pers("").description.startswith("libvirt default CPU qemu64")
    for cpu in ("<cpu mode='host-passthrough'/>", "<cpu mode='custom'><model>NoSuchCPU</model></cpu>",
                "<cpu mode='host-model'/>"):
        with pytest.raises(Unknowable):
            pers(cpu)


@pytest.mark.parametrize("hosts, vendor, signature", [
    (("sapphirerapids", "graniterapids"), "Intel", "family='6' model='143'"),
    (("epyc-milan", "epyc-genoa", "epyc-turin"), "AMD", "family='25' model='1'"),
])
def test_what_pvmit_pool_writes_for_libvirt_the_reader_reads_back(tmp_path: Path, catalog: Catalog,
                                                                  hosts: tuple[str, ...], vendor: str,
                                                                  signature: str) -> None:
    """The <cpu> element `pvmit pool --format libvirt` writes, read as a domain's CPU by the libvirt reader (on a
    CPU map that knows every name and whose base model has none), shows each bit it names as the pool decided."""
    from pvmit.pool.emit import libvirt_cpu
    from pvmit.pool.rule import pool_bit_table, pool_bits
    from pvmit.x86.feature_names import feature_names

    every = "".join(f"<feature name='{f.name}'/>" for f in feature_names().features)
    cpu_map = FileCpuMap(_map_dir(tmp_path, {"Base": f"<signature {signature}/><vendor name='{vendor}'/>"}, every))
    pool = pool_bits([(h, catalog.get(h).facts) for h in hosts])
    element = libvirt_cpu(pool, "Base").text
    shown = guest_personality(domain(f"<domain type='kvm'><name>g</name>{element}</domain>"), cpu_map, catalog).facts
    checked = 0
    for b in pool_bit_table():
        if b.rule == "never" or b.vendor != pool.vendor or not b.libvirt:
            continue
        assert shown.fact(b.register.key, b.name).value is pool.bits[b.key].show, b.key
        checked += 1
    assert checked >= 15


# --- the metadata record --------------------------------------------------------------------------------------

def _meta(inner: str) -> ET.Element:
    return ET.fromstring(f"<metadata><pvmit:pvmit xmlns:pvmit='{NAMESPACE}'>{inner}</pvmit:pvmit></metadata>")


def test_record_round_trip() -> None:
    rec = Record(GuestReading(frozenset({Mitigation.RETPOLINE}), "qemu-guest-agent", "2026-01-01T00:00:00+00:00",
                              "Mitigation: Retpolines; BHI: Retpoline", "console=ttyS0"),
                 {"unreported": "trust", "force_on": "BHI_DIS_S"})
    text = format_record(rec)
    # libvirt stores the element under its namespace; read it back as libvirt writes it
    stored = ET.fromstring(text)
    for el in stored.iter():
        el.tag = f"{{{NAMESPACE}}}{el.tag}"
    meta = ET.Element("metadata")
    meta.append(stored)
    assert parse_record(meta, "d") == rec
    assert parse_record(None, "d").empty and parse_record(ET.Element("metadata"), "d").empty


@pytest.mark.parametrize("inner, message", [
    ("<pvmit:guest source='x'/>", "no relies-on"),
    ("<pvmit:guest relies-on='unenlightened'/>", "must name"),
    ("<pvmit:guest relies-on='spectre'/>", "spectre"),
    ("<pvmit:settings force-on='IBRS_ALL'/>", "force-on"),
    ("<pvmit:settings unreported='maybe'/>", "unreported"),
])
def test_a_bad_record_is_an_error_not_nothing(inner: str, message: str) -> None:
    with pytest.raises(XmlError, match=message):
        parse_record(_meta(inner), "d")


# --- the guest agent's protocol -------------------------------------------------------------------------------

class FakeGuest:
    """qemu-ga's guest-file-* commands over a dict of files (the real agent is in test_libvirt_real.py)."""

    def __init__(self, files: dict[str, bytes], chunk: int = 7, down: bool = False) -> None:
        self.files, self.chunk, self.down = files, chunk, down
        self.open: dict[int, list[bytes]] = {}

    def __call__(self, cmd: str) -> str:
        import base64

        if self.down:
            raise qga.AgentError("Guest agent is not responding: QEMU guest agent is not connected")
        c = json.loads(cmd)
        args = c.get("arguments", {})
        if c["execute"] == "guest-ping":
            return json.dumps({"return": {}})
        if c["execute"] == "guest-file-open":
            if args["path"] not in self.files:
                return json.dumps({"error": {"class": "GenericError",
                                             "desc": f"failed to open file '{args['path']}': No such file or "
                                                     "directory"}})
            h = len(self.open) + 1000
            self.open[h] = [self.files[args["path"]]]
            return json.dumps({"return": h})
        if c["execute"] == "guest-file-read":
            data = self.open[args["handle"]]
            piece, data[0] = data[0][:min(self.chunk, args["count"])], data[0][min(self.chunk, args["count"]):]
            return json.dumps({"return": {"count": len(piece), "buf-b64": base64.b64encode(piece).decode(),
                                          "eof": not data[0]}})
        if c["execute"] == "guest-file-close":
            del self.open[args["handle"]]
            return json.dumps({"return": {}})
        return json.dumps({"error": {"desc": "unknown command"}})


def test_agent_reads_lines_and_decides() -> None:
    guest = FakeGuest({f"{qga.VULN_DIR}/spectre_v2": b"Mitigation: Retpolines; BHI: SW loop, KVM: SW loop\n",
                       f"{qga.VULN_DIR}/meltdown": b"Not affected\n", "/proc/cmdline": b"quiet\n"})
    lines = qga.read_guest(guest)
    assert lines.vulnerabilities == {"meltdown": "Not affected",
                                     "spectre_v2": "Mitigation: Retpolines; BHI: SW loop, KVM: SW loop"}
    assert lines.cmdline == "quiet" and not lines.unreadable and not guest.open  # every handle closed
    assert qga.reliance(lines).relies_on == {Mitigation.RETPOLINE, Mitigation.BHB_SHORT}


def test_agent_failures_are_unknown_with_the_reason() -> None:
    down = qga.reliance(qga.read_guest(FakeGuest({}, down=True)))
    assert down.relies_on is None and "not connected" in down.why[0]
    old_kernel = qga.reliance(qga.read_guest(FakeGuest({"/proc/cmdline": b""})))
    assert old_kernel.relies_on is None and "does not exist" in old_kernel.why[0]
    assert qga.read_file(FakeGuest({"/f": b"x" * 100}), "/f", limit=10) == "x" * 10


def test_agent_replies_that_are_not_json_are_errors() -> None:
    with pytest.raises(qga.AgentError, match="not JSON"):
        qga.read_file(lambda _c: "<html>", "/f")
    with pytest.raises(qga.AgentError, match="handle"):
        qga.read_file(lambda _c: '{"return": "x"}', "/f")


# --- the verdict ----------------------------------------------------------------------------------------------

MIGRATABLE = (FIXTURES / "migratable-cooperlake-tcg.xml").read_text()


def _with(relies: str | None, settings: str = "") -> str:
    guest = f"<pvmit:guest relies-on='{relies}' source='operator' read-at='t'/>" if relies else ""
    meta = f"<metadata><pvmit:pvmit xmlns:pvmit='{NAMESPACE}'>{guest}{settings}</pvmit:pvmit></metadata>"
    return MIGRATABLE.replace("</domain>", meta + "</domain>")


@needs_cpu_map
@pytest.mark.parametrize("relies, host, verdict, allowed", [
    ("retpoline", "icelake-sp", "safe", True),  # eIBRS without RRSBA: retpoline works
    ("retpoline", "sapphirerapids", "forced", False),  # RRSBA: needs RRSBA_DIS_S, which nobody forces here
    ("retpoline", "cascadelake-sp", "exposed", False),  # RRSBA and no RRSBA_DIS_S at all
    ("bhb-short", "alderlake", "forced", False),  # the longer history: BHI_DIS_S
    ("both", "epyc-rome", "safe", True),
    ("none", "sapphirerapids", "safe", True),
    (None, "sapphirerapids", "forced", False),  # never read: assumed from what TCG showed it (retpoline)
])
def test_verdicts(catalog: Catalog, relies: str | None, host: str, verdict: str, allowed: bool) -> None:
    a = judge(_with(relies), "dest", host, host, FileCpuMap(), catalog, HookConfig())
    assert (a.verdict, a.allowed) == (verdict, allowed), a.reasons


@needs_cpu_map
def test_hypervisor_forces_allows_forced_moves(catalog: Catalog) -> None:
    a = judge(_with("retpoline"), "d", "sapphirerapids", "x", FileCpuMap(), catalog, HookConfig(hypervisor_forces=True))
    assert (a.verdict, a.allowed, a.forced) == ("forced", True, ("RRSBA_DIS_S",))


@needs_cpu_map
def test_operator_settings_decide_with_the_policys_rules(catalog: Catalog) -> None:
    """force_off of the control a guest needs is the operator's choice: exposed, but accepted (as `check` accepts
    it); `trust` for a guest never read forces nothing."""
    cm = FileCpuMap()
    off = judge(_with("retpoline"), "d", "sapphirerapids", "x", cm, catalog,
                HookConfig(settings={"force_off": "RRSBA_DIS_S"}))
    assert (off.verdict, off.allowed) == ("exposed", True) and any("operator override" in r for r in off.reasons)
    trust = judge(_with(None, "<pvmit:settings unreported='trust'/>"), "d", "sapphirerapids", "x", cm, catalog,
                  HookConfig())
    assert (trust.verdict, trust.allowed) == ("safe", True) and trust.warnings


@needs_cpu_map
def test_what_cannot_be_understood_is_decided_by_on_unknown(catalog: Catalog) -> None:
    cm = FileCpuMap()
    cases = [MIGRATABLE.replace("Cooperlake", "NoSuchCPU"),  # a model this libvirt does not define
             "<domain", MIGRATABLE.replace("<cpu mode='custom' match='exact' check='none'>",
                                           "<cpu mode='host-passthrough'>").replace(
                 "<model fallback='forbid'>Cooperlake</model>", ""),
             _with("retpoline").replace("relies-on='retpoline'", "relies-on='nonsense'")]
    for xml in cases:
        for setting, allowed in (("refuse", False), ("allow", True)):
            a = judge(xml, "d", "icelake-sp", "x", cm, catalog, HookConfig(on_unknown=setting))  # type: ignore[arg-type]
            assert (a.verdict, a.allowed) == ("unknown", allowed) and a.decided_by.startswith("on_unknown")
    unreadable_host = judge(_with("none"), "d", None, "CPUID failed", cm, catalog, HookConfig())
    assert unreadable_host.verdict == "unknown" and "CPUID failed" in unreadable_host.reasons[0]
    bad_host = judge(_with("none"), "d", "no-such-model", "x", cm, catalog, HookConfig())
    assert bad_host.verdict == "unknown" and not bad_host.allowed


@needs_cpu_map
def test_passthrough_is_unknown_unless_the_operator_says_hosts_are_alike(catalog: Catalog) -> None:
    """A host-passthrough guest was shown its source host's CPU: even with what it relies on recorded, the bits it
    was shown cannot be checked here (the pool rule of the migration check), so it is unknown; with
    passthrough = "this-host" it is decided as shown this host's CPU."""
    xml = _with("retpoline").replace("<cpu mode='custom' match='exact' check='none'>", "<cpu mode='host-passthrough'>")
    xml = xml.replace("<model fallback='forbid'>Cooperlake</model>", "")
    cm = FileCpuMap()
    assert judge(xml, "d", "icelake-sp", "x", cm, catalog, HookConfig()).verdict == "unknown"
    alike = HookConfig(passthrough="this-host")
    assert (judge(xml, "d", "icelake-sp", "x", cm, catalog, alike).verdict, judge(
        xml, "d", "sapphirerapids", "x", cm, catalog, alike).verdict) == ("safe", "forced")


@needs_cpu_map
def test_warn_mode_allows_but_says_so(catalog: Catalog) -> None:
    a = judge(_with("retpoline"), "d", "cascadelake-sp", "x", FileCpuMap(), catalog, HookConfig(mode="warn"))
    assert (a.verdict, a.allowed, a.decided_by) == ("exposed", True, "mode = warn")


# --- the hook and its settings --------------------------------------------------------------------------------

def test_config_is_checked(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml").origin.startswith("built-in defaults")
    for doc, message in (({"colour": 1}, "unknown key"), ({"on_unknown": "maybe"}, "on_unknown"),
                         ({"settings": {"force_on": "IBRS_ALL"}}, "settings.force_on"),
                         ({"hypervisor_forces": "yes"}, "hypervisor_forces"), ({"host_cpu": " "}, "host_cpu"),
                         ({"passthrough": "maybe"}, "passthrough")):
        with pytest.raises(ConfigError, match=message):
            parse_config(doc, "f")
    c = HookConfig(host_cpu="icelake-sp", settings={"unreported": "trust"})
    again = parse_config(tomllib.loads(render_config(c)), "f")
    assert again.host_cpu == "icelake-sp" and again.settings == {"unreported": "trust"}


def test_hook_passes_every_other_operation(tmp_path: Path) -> None:
    assert decide(["d", "start", "begin", "-"], "<not xml", tmp_path / "c.toml", "t") == (0, "", None, "")


@needs_cpu_map
def test_hook_decides_and_logs(tmp_path: Path) -> None:
    cfg = tmp_path / "hook.toml"
    cfg.write_text('host_cpu = "sapphirerapids"\nlog = ""\n')
    status, message, line, _ = decide(["cooper", "migrate", "begin", "-"], _with("retpoline"), cfg, "t")
    assert status == 1 and message.startswith("pvmit: migration of cooper refused") and line is not None
    assert json.loads(line)["verdict"] == "forced"


def test_a_broken_config_refuses_with_its_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "hook.toml"
    cfg.write_text("host_cpu = [")
    status, message, line, _ = decide(["d", "migrate", "begin", "-"], "<domain/>", cfg, "t")
    assert status == 1 and str(cfg) in message and "not valid TOML" in message and line is not None


@needs_cpu_map
def test_installed_hook_runs_as_libvirt_runs_it(tmp_path: Path) -> None:
    """The script `hook install` writes, run as libvirt runs hooks (args, XML on stdin, a minimal environment):
    other operations pass at once; migrate begin decides, stdout stays empty, stderr explains."""
    cfg_path = tmp_path / "pvmit.toml"  # where the hook reads it; installed at ROOT/that path
    done = install(tmp_path, HookConfig(host_cpu="cascadelake-sp", log=str(tmp_path / "hook.log")),
                   config_path=cfg_path, python=sys.executable)
    assert done.config == tmp_path / cfg_path.relative_to("/")
    cfg_path.symlink_to(done.config)  # what the root would see, had it been '/'
    script = tmp_path / HOOK_DIR.relative_to("/") / "pvmit"
    assert done.script == script and os.stat(script).st_mode & 0o777 == 0o755 and done.config_written
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    start = subprocess.run([str(script), "cooper", "start", "begin", "-"], input="", capture_output=True, text=True,
                           env=env, timeout=60)
    assert (start.returncode, start.stdout, start.stderr) == (0, "", "")
    mig = subprocess.run([str(script), "cooper", "migrate", "begin", "-"], input=_with("retpoline"),
                         capture_output=True, text=True, env=env, timeout=120)
    assert mig.returncode == 1 and mig.stdout == "" and "refused" in mig.stderr
    assert json.loads((tmp_path / "hook.log").read_text())["verdict"] == "exposed"
    kept = install(tmp_path, HookConfig(), config_path=cfg_path, python=sys.executable)
    assert not kept.config_written and "cascadelake-sp" in cfg_path.read_text()


def test_install_needs_absolute_paths(tmp_path: Path) -> None:
    from pvmit.errors import InputError

    with pytest.raises(InputError, match="absolute"):
        install(tmp_path, HookConfig(), python="python3")
    with pytest.raises(InputError, match="absolute"):
        install(tmp_path, HookConfig(), config_path=Path("rel.toml"))


# --- without the binding --------------------------------------------------------------------------------------

def test_without_the_binding_commands_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from pvmit.libvirt import connection

    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(connection.LibvirtUnavailable, match=r"pip install 'pvmit\[libvirt\]'"):
        connection.binding()


def test_fleet_refuses_uris_mixed_with_files(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("fleet", "plan", "qemu:///system", str(tmp_path / "inv.json"))
    assert r.code == 2 and "not both" in r.stderr


# --- the inventory's relies_on column and inline personalities ------------------------------------------------

def test_relies_on_is_decided_as_a_report(catalog: Catalog, tmp_path: Path) -> None:
    """A VM with no interface whose kernel was read relying on nothing is safe everywhere; the same VM unread is
    judged from its personality (no eIBRS shown: retpoline assumed)."""
    from fleet_helpers import host, plan_of, vm, write_json

    hosts = [host("spr", "sapphirerapids"), host("icx", "icelake-sp")]
    vms = [vm("read", "icx", "skylake-sp", "unenlightened", form="none", relies_on="none"),
           vm("unread", "icx", "skylake-sp", "unenlightened", form="none")]  # no eIBRS shown: retpoline assumed
    p = plan_of(catalog, write_json(tmp_path / "i.json", hosts, vms))
    assert not p.fleet.errors
    by_name = {c.mitigations: c for c in p.fleet.vm_classes}
    assert set(by_name) == {"none (read in the guest)", "unenlightened"}
    verdicts = {p.fleet.vm_classes[i].mitigations: [int(v) for v in p.verdict[i]] for i in range(2)}
    assert verdicts["none (read in the guest)"] == [0, 0]  # relies on nothing: safe on both
    assert verdicts["unenlightened"] == [1, 0]  # assumed retpoline: RRSBA_DIS_S forced on the Sapphire Rapids


def test_relies_on_errors(catalog: Catalog, tmp_path: Path) -> None:
    from fleet_helpers import host, load, vm, write_json

    vms = [vm("a", "h", "cooperlake", "retpoline", relies_on="none"),  # reported through the interface
           vm("b", "h", "cooperlake", "unenlightened", form="none", relies_on="unenlightened"),
           vm("c", "h", "cooperlake", "unenlightened", form="none", relies_on="spectre")]
    f = load(catalog, write_json(tmp_path / "i.json", [host("h", "icelake-sp")], vms))
    errs = {(e.row, e.field) for e in f.errors.first()}
    assert errs == {(1, "relies_on"), (2, "relies_on"), (3, "relies_on")} and f.num_vms == 0


def test_inline_personality_json(catalog: Catalog, tmp_path: Path) -> None:
    from fleet_helpers import host, load, vm, write_json

    from pvmit.vmm.personality import from_model

    p = from_model(catalog, "cooperlake").to_json()
    vms = [vm("a", "h", p, "unenlightened", form="none"),  # type: ignore[arg-type]
           vm("b", "h", "{not json", "unenlightened", form="none")]
    f = load(catalog, write_json(tmp_path / "i.json", [host("h", "icelake-sp")], vms))
    assert f.num_vms == 1 and f.vm_classes[0].personality == "cooperlake"
    assert [(e.row, e.field) for e in f.errors.first()] == [(2, "personality")]


def test_cli_errors_are_one_line_and_write_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    out = tmp_path / "inv.json"
    out.write_text("the inventory of yesterday")
    for args, code in ((["libvirt", "inventory", bad, "-o", str(out)], 1),
                       (["libvirt", "check", "vm", "-c", bad, "--to", bad], 1),
                       (["libvirt", "record", "-c", bad], 1),
                       (["fleet", "plan", bad], 1),
                       (["libvirt", "hook", "install", "--root", str(tmp_path / "none")], 2),
                       (["libvirt", "record", "-c", bad, "--relies-on", "unenlightened"], 2),
                       (["libvirt", "check", "vm", "--to", bad, "--config", str(tmp_path / "none.toml"),
                         "--on-unknown", "maybe"], 2)):
        r = cli(*args)
        assert r.code == code and "Traceback" not in r.stderr and r.stderr.strip(), (args, r)
    assert out.read_text() == "the inventory of yesterday"  # nothing read, nothing replaced


@needs_cpu_map
def test_hook_reads_this_hosts_cpu_by_default(tmp_path: Path) -> None:
    cfg = tmp_path / "hook.toml"
    cfg.write_text('log = ""\n')  # host_cpu = "inspect", the default
    status, message, line, _ = decide(["cooper", "migrate", "begin", "-"], _with("none"), cfg, "t")
    doc = json.loads(line or "{}")
    assert doc["verdict"] != "unknown" and "read on this host" in doc["host"]["cpu"], message


@needs_cpu_map
def test_hook_host_cpu_from_a_facts_file_next_to_the_settings(tmp_path: Path, catalog: Catalog) -> None:
    (tmp_path / "host.json").write_text(json.dumps(catalog.get("sapphirerapids").facts.to_json()))
    cfg = tmp_path / "hook.toml"
    cfg.write_text('host_cpu = "host.json"\nlog = ""\n')
    status, _, line, _ = decide(["cooper", "migrate", "begin", "-"], _with("retpoline"), cfg, "t")
    assert status == 1 and json.loads(line or "{}")["verdict"] == "forced"
