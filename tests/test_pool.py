"""The pool rule (which speculation bits a pool may show), its use by the migration check, and its output for QEMU,
libvirt and Firecracker, each checked against the tool's own names or rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from itertools import combinations
from pathlib import Path

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.state import check, snapshot
from pvmit.pool.emit import firecracker_template, libvirt_cpu, qemu_cpu
from pvmit.pool.rule import (
    CHECKED_RULES,
    host_safe_bits,
    personality_for_pool,
    pool_bit_table,
    pool_bits,
    shown_bit_violations,
)
from pvmit.x86.registers import REGISTERS

NAMES = Path(__file__).parent / "fixtures" / "vmm_names"
POOL_REGISTERS = ("arch_capabilities", "cpuid_7_0_edx", "cpuid_7_2_edx", "cpuid_80000008_ebx", "cpuid_80000021_eax",
                  "cpuid_80000021_ecx")


def _pool(catalog: Catalog, *ids: str):  # type: ignore[no-untyped-def]
    return pool_bits([(i, catalog.get(i).facts) for i in ids])


def test_every_guest_visible_bit_has_a_rule() -> None:
    table = {(b.register.key, b.name) for b in pool_bit_table()}
    for key in POOL_REGISTERS:
        for name in REGISTERS[key].bit_names():
            assert (key, name) in table, f"{key}.{name} has no row in pool/bits.toml"
    assert len(table) == len(pool_bit_table())


@pytest.mark.parametrize("tool,column", [("qemu_feature_names", "qemu"), ("libvirt_cpu_map", "libvirt")])
def test_names_are_the_tools_own_for_the_same_bit(tool: str, column: str) -> None:
    """Every QEMU/libvirt name a pool bit has (x86/data/feature_names.toml) is the name the tool's source gives that
    register's bit."""
    words = json.loads((NAMES / f"{tool}.json").read_text())["words"]
    used = 0
    for b in pool_bit_table():
        name = getattr(b, column)
        if not name:
            continue
        bit = b.mask.bit_length() - 1
        assert words[b.register.key].get(str(bit)) == name, (b.key, name, words[b.register.key].get(str(bit)))
        used += 1
    assert used > 40


def test_its_no_only_where_no_host_is_affected(catalog: Catalog) -> None:
    mixed = _pool(catalog, "cascadelake-sp", "icelake-sp", "sapphirerapids")
    v = mixed.bits["arch_capabilities.ITS_NO"]
    assert not v.show and "cascadelake-sp" in v.why and "ITS" in v.why
    new = _pool(catalog, "sapphirerapids", "graniterapids")
    assert new.bits["arch_capabilities.ITS_NO"].show  # BHI_CTRL: 'None of the affected CPUs have BHI_CTRL'
    # RRSBA is a behaviour: shown wherever a host has it (or may have it)
    assert mixed.bits["arch_capabilities.RRSBA"].show
    assert not _pool(catalog, "icelake-sp").bits["arch_capabilities.RRSBA"].show
    # MITIGATION_ENUM: Cascade Lake cannot honour retpoline, every host honours the short loop
    assert mixed.mitigation_enum == 1 and new.mitigation_enum == 3


def test_tsa_bits_only_on_pools_without_zen3_or_zen4(catalog: Catalog) -> None:
    mixed = _pool(catalog, "epyc-milan", "epyc-turin")
    assert not mixed.bits["cpuid_80000021_ecx.TSA_SQ_NO"].show
    assert "epyc-milan" in mixed.bits["cpuid_80000021_ecx.TSA_L1_NO"].why
    turin = _pool(catalog, "epyc-turin")
    assert turin.bits["cpuid_80000021_ecx.TSA_SQ_NO"].show and turin.bits["cpuid_80000021_ecx.TSA_L1_NO"].show
    # an AMD pool shows no Intel bit, and a mixed-vendor pool shows nothing it decides
    assert not turin.bits["arch_capabilities.RDCL_NO"].show
    both = _pool(catalog, "epyc-turin", "sapphirerapids")
    assert both.vendor is None and both.warnings
    assert not any(v.show for k, v in both.bits.items())


def test_what_a_pool_shows_is_true_on_each_of_its_hosts(catalog: Catalog) -> None:
    """The pool rule and the migration check agree: every checked bit a pool of two catalog models shows stays
    true on both (so a VM of that pool is refused by neither of them for a bit)."""
    ids = [m.id for m in catalog]
    for a, b in combinations(ids, 2):
        pool = _pool(catalog, a, b)
        for bit in pool_bit_table():
            if bit.rule in CHECKED_RULES and pool.bits[bit.key].show:
                for m in (a, b):
                    assert host_safe_bits(catalog.get(m).facts)[bit.register.key][0] & bit.mask, (a, b, bit.key)


def test_a_catalog_model_takes_a_vm_booted_with_it(catalog: Catalog) -> None:
    for m in catalog:
        assert not shown_bit_violations(m.facts, m.facts), m.id


def test_pool_personality_is_refused_by_no_host_of_its_pool(catalog: Catalog) -> None:
    groups = [("cascadelake-sp", "icelake-sp", "sapphirerapids", "graniterapids"), ("sapphirerapids", "graniterapids"),
              ("epyc-milan", "epyc-genoa", "epyc-turin"), ("epyc-rome", "epyc-milan")]
    for group in groups:
        pool = _pool(catalog, *group)
        for start in group:
            shown = personality_for_pool(catalog.get(start).facts, pool)
            for h in group:
                assert not shown_bit_violations(shown, catalog.get(h).facts), (group, start, h)


def _vm_shown(facts, host):  # type: ignore[no-untyped-def]
    return VmInterface(InterfaceConfig(Form.INTEL, 0), host, facts)


def test_migration_refuses_a_vm_shown_its_no_on_an_its_affected_host(catalog: Catalog) -> None:
    """The issue's example: a guest booted in a Sapphire Rapids/Granite Rapids pool is shown ITS_NO; Cascade Lake is
    ITS-affected, so the migration check refuses it there, naming the bit and why, as it refuses an exposure."""
    spr, gnr, clx = (catalog.get(m).facts for m in ("sapphirerapids", "graniterapids", "cascadelake-sp"))
    shown = personality_for_pool(spr, pool_bits([("spr", spr), ("gnr", gnr)]))
    assert shown.fact("arch_capabilities", "ITS_NO").value
    state = snapshot(_vm_shown(shown, spr))
    assert check(state, gnr).accepted
    refused = check(state, clx)
    assert not refused.accepted
    assert any("IA32_ARCH_CAPABILITIES.ITS_NO" in r and "affected by ITS" in r for r in refused.reasons)


def _intel_pool(catalog: Catalog):  # type: ignore[no-untyped-def]
    return _pool(catalog, "cascadelake-sp", "icelake-sp", "sapphirerapids")


def test_qemu_cpu_string(catalog: Catalog) -> None:
    pool = _intel_pool(catalog)
    e = qemu_cpu(pool, "Cascadelake-Server")
    assert e.text.startswith("-cpu Cascadelake-Server,")
    flags = e.text.removeprefix("-cpu ").split(",")[1:]
    assert "-its-no" in flags and "+mds-no" in flags and "-bhi-ctrl" in flags
    assert "arch_capabilities.RRSBA" in e.unexpressed  # QEMU has no name for RRSBA
    older = qemu_cpu(pool, "Cascadelake-Server", frozenset({"mds-no"}))
    assert older.text == "-cpu Cascadelake-Server,+mds-no" and older.warnings


QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.qemu
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
@pytest.mark.parametrize("hosts", [("cascadelake-sp", "icelake-sp", "sapphirerapids"), ("epyc-rome", "epyc-milan")])
def test_qemu_accepts_every_flag_it_is_given(cli, hosts: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    """The emitted -cpu, restricted to what this QEMU knows (--qemu), starts this QEMU (TCG, stopped, quit by QMP)
    with no complaint about a flag or the model."""
    r = cli("pool", *hosts, "--format", "qemu", "--qemu", QEMU)
    assert r.code == 0, r.stderr
    cpu = r.stdout.strip().removeprefix("-cpu ")
    assert "," in cpu
    done = subprocess.run([QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", cpu, "-nodefaults", "-display", "none",
                           "-S", "-qmp", "stdio"], input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"not found|can't apply|unknown|invalid", done.stderr, re.I), done.stderr


def test_libvirt_cpu_element(catalog: Catalog) -> None:
    pool = _intel_pool(catalog)
    e = libvirt_cpu(pool, "Cascadelake-Server")
    cpu = ET.fromstring(e.text)
    assert cpu.tag == "cpu" and cpu.get("mode") == "custom" and cpu.get("match") == "exact"
    assert cpu.findtext("model") == "Cascadelake-Server" and cpu.find("model").get("fallback") == "forbid"  # type: ignore[union-attr]
    features = {f.get("name"): f.get("policy") for f in cpu.findall("feature")}
    assert features["mds-no"] == "require" and features["gds-no"] == "disable"
    words = json.loads((NAMES / "libvirt_cpu_map.json").read_text())["words"]
    names = {n for w in words.values() for n in w.values()}
    assert set(features) <= names and set(features.values()) <= {"require", "disable"}
    assert "arch_capabilities.ITS_NO" in e.unexpressed  # not in cpu_map yet


def test_libvirt_cpu_element_names_only_what_that_libvirt_knows(catalog: Catalog) -> None:
    """A libvirt refuses a whole <cpu> naming a feature it does not know: names outside its CPU map are left out
    and said (libvirt 9.0, Debian 12's, has no name for any CPUID.(7,2).EDX bit)."""
    pool = _intel_pool(catalog)
    e = libvirt_cpu(pool, "Cascadelake-Server", lambda name: name != "bhi-ctrl")
    names = {f.get("name") for f in ET.fromstring(e.text).findall("feature")}
    assert "bhi-ctrl" not in names and "mds-no" in names
    assert e.warnings and "bhi-ctrl" in e.warnings[0]


def test_pool_cli_libvirt_cpu_map(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "x86_features.xml").write_text("<cpus><feature name='mds-no'/><feature name='spec-ctrl'/></cpus>")
    (tmp_path / "x86_Cascadelake-Server.xml").write_text(
        "<cpus><model name='Cascadelake-Server'><feature name='spec-ctrl'/></model></cpus>")
    r = cli("pool", "cascadelake-sp", "sapphirerapids", "--format", "libvirt", "--libvirt-cpu-map", str(tmp_path))
    assert r.code == 0, r.stderr
    cpu = ET.fromstring(r.stdout)
    assert cpu.findtext("model") == "Cascadelake-Server"
    assert {f.get("name") for f in cpu.findall("feature")} <= {"mds-no", "spec-ctrl"}
    r = cli("pool", "sapphirerapids", "--format", "libvirt", "--libvirt-cpu-map", str(tmp_path))
    assert r.code == 2 and "defines" in r.stderr  # SapphireRapids is not in that map


CPU_MAP = Path("/usr/share/libvirt/cpu_map/x86_features.xml")


@pytest.mark.skipif(not CPU_MAP.exists(), reason=f"{CPU_MAP} is not installed (libvirt-daemon)")
def test_installed_libvirt_cpu_map_names_the_same_bits() -> None:
    """Every name pvmit emits that the installed libvirt knows is, there too, the same register bit."""
    root = ET.parse(CPU_MAP).getroot()
    where: dict[str, tuple[str, int]] = {}
    for f in root.iter("feature"):
        name = f.get("name") or ""
        c, m = f.find("cpuid"), f.find("msr")
        if c is not None:
            for reg in ("eax", "ebx", "ecx", "edx"):
                if c.get(reg):
                    leaf, sub = int(c.get("eax_in", "0"), 16), int(c.get("ecx_in", "0"), 16)
                    where[name] = (f"{leaf:#x}.{sub}.{reg}", int(c.get(reg, "0"), 16))
        elif m is not None:
            where[name] = (f"msr {int(m.get('index', '0'), 16):#x}",
                           int(m.get("edx", "0"), 16) << 32 | int(m.get("eax", "0"), 16))
    checked = 0
    for b in pool_bit_table():
        if b.libvirt and b.libvirt in where:
            reg = b.register
            loc = f"msr {reg.index:#x}" if reg.kind == "msr" else f"{reg.index:#x}.{reg.subleaf}.{reg.out}"
            assert where[b.libvirt] == (loc, b.mask), (b.key, where[b.libvirt])
            checked += 1
    assert checked >= 15


BITMAP = {32: re.compile(r"^0b[01x]{32}$"), 64: re.compile(r"^0b[01x]{64}$")}


def _apply(bitmap: str, value: int) -> int:
    bits = bitmap[2:].replace("_", "")
    for i, c in enumerate(reversed(bits)):
        if c != "x":
            value = (value & ~(1 << i)) | (int(c) << i)
    return value


@pytest.mark.parametrize("hosts", [("cascadelake-sp", "icelake-sp", "sapphirerapids"),
                                   ("epyc-milan", "epyc-genoa", "epyc-turin")])
def test_firecracker_template_follows_the_schema_and_shows_the_pool(catalog: Catalog,
                                                                    hosts: tuple[str, ...]) -> None:
    """docs/cpu_templates/schema.json: leaf/subleaf/addr are strings holding integers, flags an integer, register one
    of eax..edx, bitmaps 0b[01x]{32} (CPUID) or 0b[01x]{64} (MSR). Applied to any host's registers, the template
    yields exactly what the pool shows on every bit it decides."""
    facts = [(h, catalog.get(h).facts) for h in hosts]
    pool = pool_bits(facts)
    template, _ = firecracker_template(pool, facts)
    assert set(template) == {"cpuid_modifiers", "msr_modifiers"}
    applied: dict[str, str] = {}
    for leaf in template["cpuid_modifiers"]:  # type: ignore[attr-defined]
        assert set(leaf) == {"leaf", "subleaf", "flags", "modifiers"}
        int(leaf["leaf"], 0), int(leaf["subleaf"], 0)
        assert isinstance(leaf["flags"], int)
        for mod in leaf["modifiers"]:
            assert mod["register"] in ("eax", "ebx", "ecx", "edx") and BITMAP[32].match(mod["bitmap"])
            key = next(r.key for r in REGISTERS.values() if r.kind == "cpuid" and r.index == int(leaf["leaf"], 0)
                       and r.subleaf == int(leaf["subleaf"], 0) and r.out == mod["register"])
            applied[key] = mod["bitmap"]
    for msr in template["msr_modifiers"]:  # type: ignore[attr-defined]
        assert set(msr) == {"addr", "bitmap"} and BITMAP[64].match(msr["bitmap"])
        assert int(msr["addr"], 0) == 0x10A
        applied["arch_capabilities"] = msr["bitmap"]
    assert applied
    for b in pool_bit_table():
        if b.rule == "never" or b.vendor != pool.vendor:
            continue
        for _, f in facts:
            got = _apply(applied[b.register.key], f.reg(b.register.key).value)
            assert bool(got & b.mask) == pool.bits[b.key].show, (b.key, f)


def test_cli_pool_json_and_formats(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("pool", "sapphirerapids", "GraniteRapids", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "pvmit.pool/1" and doc["vendor"] == "intel"
    assert doc["bits"]["arch_capabilities.ITS_NO"] == {"show": 1, "why": doc["bits"]["arch_capabilities.ITS_NO"]["why"]}
    assert all(set(v) == {"show", "why"} and v["show"] in (0, 1) and v["why"] for v in doc["bits"].values())
    assert doc["mitigation_enum"]["value"] == 3 and doc["base_model"] == "SapphireRapids"
    assert cli("pool", "sapphirerapids", "--format", "json").stdout == cli("pool", "sapphirerapids", "--json").stdout
    r = cli("pool", "sapphirerapids", "graniterapids", "--format", "libvirt")
    assert r.code == 0 and ET.fromstring(r.stdout).tag == "cpu"
    r = cli("pool", "epyc-milan", "epyc-turin", "--format", "firecracker")
    assert r.code == 0 and "cpuid_modifiers" in json.loads(r.stdout)
    r = cli("pool", "nosuchcpu")
    assert r.code == 2 and "nosuchcpu" in r.stderr and "Traceback" not in r.stderr
    # a host given as the facts `pvmit host --json` wrote
    h = cli("host", "--json", "--no-kvm")
    assert h.code == 0, h.stderr
    (tmp_path / "me.json").write_text(h.stdout)
    r = cli("pool", str(tmp_path / "me.json"), "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["hosts"][0].startswith(str(tmp_path / "me.json"))
