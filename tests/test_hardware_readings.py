"""The catalog against real-hardware register readings (Firecracker's CPU fingerprints of Cascade Lake, Ice Lake-SP,
Sapphire Rapids, Granite Rapids, Milan and Genoa hosts): on every bit both know, they agree bit for bit."""

from __future__ import annotations

import pytest
from hardware_readings import FIXTURES, Reading, readings

from pvmit.catalog.loader import Catalog
from pvmit.x86.registers import REGISTERS, decode

READINGS = readings()


def test_every_reading_is_here() -> None:
    assert {r.model for r in READINGS} == {"cascadelake-sp", "icelake-sp", "sapphirerapids", "graniterapids",
                                          "epyc-milan", "epyc-genoa"}, sorted(FIXTURES.iterdir())


@pytest.mark.parametrize("r", READINGS, ids=lambda r: r.model)
def test_reading_is_of_the_model_it_names(catalog: Catalog, r: Reading) -> None:
    m = catalog.get(r.model)
    assert (m.vendor, m.family) == (r.vendor, r.family) and r.cpu_model in m.models
    assert not m.steppings or r.stepping in m.steppings


@pytest.mark.parametrize("r", READINGS, ids=lambda r: r.model)
def test_catalog_agrees_bit_for_bit(catalog: Catalog, r: Reading) -> None:
    facts = catalog.get(r.model).facts
    compared = 0
    for key, informative in r.informative.items():
        reg = REGISTERS[key]
        known = facts.reg(key)
        both = informative & known.known & reg.named_mask
        diff = (known.value ^ r.values[key]) & both
        assert not diff, (f"{r.model} {reg.name}: the catalog says {decode(reg, known.value & diff)} where "
                          f"{r.source} reads {decode(reg, r.values[key] & diff)} on bits {decode(reg, diff)}")
        compared += bin(both).count("1")
    assert compared >= 10, f"{r.model}: only {compared} bits compared"


@pytest.mark.parametrize("r", READINGS, ids=lambda r: r.model)
def test_what_a_reading_confirms_cites_it(catalog: Catalog, r: Reading) -> None:
    """A fact the reading gives is in the catalog, citing the reading (not a rule for a class of parts)."""
    facts = catalog.get(r.model).facts
    for key, informative in r.informative.items():
        reg = REGISTERS[key]
        for name in reg.bit_names():
            if not informative & reg.bit(name):
                continue
            f = facts.fact(key, name)
            assert f.known and not f.inferred and f.source.startswith("firecracker:"), (r.model, key, name, f)


def test_corrections_from_real_hardware(catalog: Catalog) -> None:
    """catalog-corrections.md, the rows the readings settle."""
    clx = catalog.get("cascadelake-sp").facts
    assert clx.fact("arch_capabilities", "RRSBA").value and not clx.fact("arch_capabilities", "RRSBA").inferred
    assert clx.fact("cpuid_7_2_edx", "RRSBA_CTRL").value is False
    for model in ("cascadelake-sp", "icelake-sp", "sapphirerapids", "graniterapids"):
        assert catalog.get(model).facts.fact("arch_capabilities", "RSBA").value is False
        assert catalog.get(model).facts.fact("arch_capabilities", "BHI_NO").source.startswith("firecracker:")
    for model in ("sapphirerapids", "graniterapids"):
        f = catalog.get(model).facts.fact("arch_capabilities", "RRSBA")
        assert f.value and not f.inferred


def test_kvm_synthesised_bits_are_not_taken_for_hardware() -> None:
    """KVM sets ITS_NO for SPR/GNR guests and (before Carlos Lopez's fix) TSA_SQ_NO/TSA_L1_NO for Zen 3/4 guests:
    neither says anything about the hardware, so the readings must not be read as evidence for them."""
    spr = next(r for r in READINGS if r.model == "sapphirerapids")
    its_no = REGISTERS["arch_capabilities"].bit("ITS_NO")
    assert spr.values["arch_capabilities"] & its_no and not spr.informative["arch_capabilities"] & its_no
    icx = next(r for r in READINGS if r.model == "icelake-sp")
    taa_no = REGISTERS["arch_capabilities"].bit("TAA_NO")  # cleared by KVM on a host that hides RTM
    assert not icx.values["arch_capabilities"] & taa_no and not icx.informative["arch_capabilities"] & taa_no
