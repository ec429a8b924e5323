"""The CPU catalog: coverage, sources, lookups, and the errors a malformed operator file gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvmit.catalog.loader import Catalog, load_catalog
from pvmit.errors import CatalogError, UnknownModelError
from pvmit.x86.registers import CPU_FACT_REGISTERS

REQUIRED = {
    "Skylake-SP": "skylake-sp", "Cascade Lake": "cascadelake-sp", "Ice Lake-SP": "icelake-sp",
    "Sapphire Rapids": "sapphirerapids", "Emerald Rapids": "emeraldrapids", "Granite Rapids": "graniterapids",
    "Sierra Forest": "sierraforest", "Alder Lake": "alderlake", "Raptor Lake": "raptorlake",
    "Naples": "epyc-naples", "Rome": "epyc-rome", "Milan": "epyc-milan", "Genoa": "epyc-genoa",
    "Turin": "epyc-turin",
}


def test_catalog_covers_what_the_project_needs(catalog: Catalog) -> None:
    assert len(catalog) >= 24
    ids = {m.id for m in catalog}
    assert set(REQUIRED.values()) <= ids
    assert {m.vendor for m in catalog} >= {"intel", "amd"}
    assert {m.segment for m in catalog} >= {"server", "client"}
    zen = {m.microarchitecture for m in catalog if m.vendor == "amd"}
    assert {"Zen", "Zen 2", "Zen 3", "Zen 4", "Zen 5"} <= zen


def test_every_known_fact_cites_a_defined_source(catalog: Catalog) -> None:
    for m in catalog:
        assert m.facts.identity_source.split(":")[0] in catalog.sources, m.id
        for reg in CPU_FACT_REGISTERS:
            rf = m.facts.reg(reg.key)
            for bit in reg.bit_names():
                f = rf.fact(bit)
                if not f.known:
                    continue
                key = f.source.split(":")[0].strip()
                assert key in catalog.sources or f.source.startswith("implied:"), (m.id, reg.key, bit, f.source)


def test_amd_models_have_no_arch_capabilities(catalog: Catalog) -> None:
    for m in catalog:
        if m.vendor != "intel":
            assert m.facts.reg("arch_capabilities").value == 0, m.id


@pytest.mark.parametrize("name,expected", [
    ("Cascadelake-Server", "cascadelake-sp"), ("cascadelake-server", "cascadelake-sp"),
    ("CASCADELAKE-SERVER", "cascadelake-sp"), ("Icelake-Server", "icelake-sp"),
    ("SapphireRapids", "sapphirerapids"), ("GraniteRapids", "graniterapids"), ("SierraForest", "sierraforest"),
    ("EPYC-Rome", "epyc-rome"), ("epyc-genoa", "epyc-genoa"), ("EPYC", "epyc-naples"), ("EPYC-Milan", "epyc-milan"),
    ("Skylake-Server-IBRS", None), ("spr", "sapphirerapids"), ("Sapphire Rapids", "sapphirerapids"),
])
def test_lookup_by_qemu_name_any_case(catalog: Catalog, name: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(UnknownModelError):
            catalog.get(name)
    else:
        assert catalog.get(name).id == expected


def test_qemu_versions_are_refused_not_silently_mapped(catalog: Catalog) -> None:
    """QEMU's -vN versions show guests different bits (Cascadelake-Server-v1 has no ARCH_CAPABILITIES); the catalog
    describes hardware, so a versioned name is refused with the name to use."""
    with pytest.raises(UnknownModelError, match="version of a QEMU CPU model.*'cascadelake-server' instead"):
        catalog.get("Cascadelake-Server-v2")


def test_unknown_model_error_suggests(catalog: Catalog) -> None:
    with pytest.raises(UnknownModelError, match="did you mean.*cascadelake-sp"):
        catalog.get("cascade")


GOOD = """
[sources.mine]
title = "Our own lab measurement"

[[cpu]]
id = "lab-cpu"
name = "Lab CPU"
vendor = "intel"
family = 6
model = 0x8f
steppings = [8]
microarchitecture = "Golden Cove"
segment = "server"
identity_source = "mine: rack 12"
[cpu.arch_capabilities]
IBRS_ALL = { value = true, source = "mine: rdmsr 0x10a" }
RRSBA = { value = false, source = "mine: rdmsr 0x10a" }
[cpu.cpuid_7_2_edx]
RRSBA_CTRL = { value = true, source = "mine" }
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_operator_file_adds_models(tmp_path: Path) -> None:
    cat = load_catalog([write(tmp_path, GOOD)])
    m = cat.get("LAB-CPU")
    assert m.origin.endswith("mine.toml")
    assert m.facts.fact("arch_capabilities", "RRSBA").value is False
    assert m.facts.fact("arch_capabilities", "RSBA").value is None  # not listed: unknown
    # known IA32_ARCH_CAPABILITIES bits imply the CPUID enumeration bits, with the reason as source
    f = m.facts.fact("cpuid_7_0_edx", "ARCH_CAPABILITIES")
    assert f.value is True and f.source.startswith("implied:")
    assert len(cat) == len(load_catalog()) + 1


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.replace('id = "lab-cpu"', 'id = "Lab CPU!"'), r"cpu entry #1 .*field id: String should match"),
    (lambda s: s.replace('family = 6\n', 'family = "six"\n'), r"cpu entry #1 \(id 'lab-cpu'\): field family"),
    (lambda s: s.replace('segment = "server"\n', ''), r"field segment: Field required"),
    (lambda s: s.replace("IBRS_ALL =", "IBRS_EVERYWHERE ="),
     r"field arch_capabilities.IBRS_EVERYWHERE: IA32_ARCH_CAPABILITIES has no bit named 'IBRS_EVERYWHERE'"),
    (lambda s: s.replace('source = "mine: rdmsr 0x10a" }\nRRSBA', 'source = "theirs" }\nRRSBA'),
     r"field arch_capabilities.IBRS_ALL.source: source 'theirs' is not defined"),
    (lambda s: s.replace("[cpu.cpuid_7_2_edx]", "[cpu.cpuid_9_edx]"), r"field cpuid_9_edx: Extra inputs"),
    (lambda s: s.replace("value = true, source = \"mine\"", "value = \"yes please\", source = \"mine\""),
     r"field cpuid_7_2_edx.RRSBA_CTRL.value"),
    (lambda s: s.replace('vendor = "intel"', 'vendor = "amd"'), r"only Intel CPUs have IA32_ARCH_CAPABILITIES"),
    (lambda s: s.replace("model = 0x8f", "model = 0x1ff"), r"field model: Value error, 511 is outside 0..255"),
    (lambda s: s.replace('id = "lab-cpu"', 'id = "sapphirerapids"'), r"'sapphirerapids' already names sapphirerapids"),
    (lambda s: s.replace('name = "Lab CPU"', 'name = "Lab CPU"\nqemu = ["Cascadelake-Server"]'),
     r"'cascadelake-server' already names cascadelake-sp"),
    (lambda s: s + '[cpu.cpuid_7_0_edx]\nARCH_CAPABILITIES = { value = false, source = "mine" }\n',
     r"field cpuid_7_0_edx.ARCH_CAPABILITIES: is false, but known arch_capabilities bits imply it"),
    (lambda s: s.replace("[[cpu]]", "[[cpus]]"), r"unknown top-level key\(s\) \['cpus'\]"),
    (lambda s: s.replace("[sources.mine]", "[sources.mine]\nurl = 3"), r"source 'mine': field url"),
    (lambda s: s + "\nthis is = not toml [", r"not valid TOML"),
    (lambda s: s.replace('value = true, source = "mine"', 'value = "on", source = "mine"'),
     r"field cpuid_7_2_edx.RRSBA_CTRL.value: Input should be a valid boolean"),
    (lambda s: s.replace('value = true, source = "mine"', 'value = 1, source = "mine"'),
     r"field cpuid_7_2_edx.RRSBA_CTRL.value: Input should be a valid boolean"),
    (lambda s: s.replace("family = 6\n", 'family = "6"\n'), r"field family: Input should be a valid integer"),
    (lambda s: s.replace("steppings = [8]", 'steppings = ["8"]'), r"field steppings.0"),
])
def test_malformed_entries_name_file_entry_and_field(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    p = write(tmp_path, mutate(GOOD))
    with pytest.raises(CatalogError, match=message) as e:
        load_catalog([p])
    assert str(p) in str(e.value)


def test_unreadable_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog file"):
        load_catalog([tmp_path / "missing.toml"])
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(CatalogError, match="not UTF-8"):
        load_catalog([bad])


def test_cli_catalog_list_show_check(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("catalog", "list", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["count"] >= 24 and {"id", "qemu", "vendor"} <= set(doc["models"][0])
    r = cli("catalog", "show", "Cascadelake-Server", "--json")
    doc = json.loads(r.stdout)
    assert doc["id"] == "cascadelake-sp" and doc["linux_guest"]["mode"] == "eibrs"
    assert doc["facts"]["registers"]["arch_capabilities"]["sources"]["IBRS_ALL"].startswith("firecracker")
    r = cli("catalog", "show", "EPYC-Rome")
    assert r.code == 0 and "EPYC Rome" in r.stdout and "Retpolines" in r.stdout
    r = cli("catalog", "show", "no-such-cpu")
    assert r.code == 2 and r.stdout == "" and "no CPU model named 'no-such-cpu'" in r.stderr
    p = write(tmp_path, GOOD)
    r = cli("catalog", "check", str(p))
    assert r.code == 0 and "1 model(s): lab-cpu" in r.stdout
    r = cli("--catalog", str(p), "catalog", "show", "lab-cpu", "--json")
    assert r.code == 0 and json.loads(r.stdout)["origin"] == str(p)
    p2 = write(tmp_path, GOOD.replace("RRSBA_CTRL", "RRSBA_KNOB"), "broken.toml")
    r = cli("catalog", "check", str(p2))
    assert r.code == 2 and "broken.toml: cpu entry #1 (id 'lab-cpu'): field cpuid_7_2_edx.RRSBA_KNOB" in r.stderr
    assert "Traceback" not in r.stderr
