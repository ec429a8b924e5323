"""Bit layouts and lossless decoding."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvmit.x86 import REGISTERS, bits, decode, encode, register
from pvmit.x86.feature_names import feature_names, parse_feature_names
from pvmit.x86.registers import (
    KVM_MSRS_TAKEN,
    MSR_IA32_ARCH_CAPABILITIES,
    MSR_IA32_SPEC_CTRL,
    MSR_VIRTUAL_ENUMERATION,
    MSR_VIRTUAL_MITIGATION_CTRL,
    MSR_VIRTUAL_MITIGATION_ENUM,
)


def test_the_bits_the_interface_depends_on() -> None:
    assert MSR_IA32_SPEC_CTRL == 0x48 and MSR_IA32_ARCH_CAPABILITIES == 0x10A
    assert bits.SpecCtrl.RRSBA_DIS_S == 1 << 6 and bits.SpecCtrl.BHI_DIS_S == 1 << 10
    assert bits.ArchCapabilities.IBRS_ALL == 1 << 1 and bits.ArchCapabilities.RSBA == 1 << 2
    assert bits.ArchCapabilities.RRSBA == 1 << 19 and bits.ArchCapabilities.BHI_NO == 1 << 20
    assert bits.ArchCapabilities.VIRTUAL_ENUM == 1 << 63
    assert bits.Cpuid7_2Edx.RRSBA_CTRL == 1 << 2 and bits.Cpuid7_2Edx.BHI_CTRL == 1 << 4
    assert [int(b) for b in bits.Cpuid7_2Edx][:6] == [1, 2, 4, 8, 16, 32]  # PSFD .. MCDT_NO
    assert (MSR_VIRTUAL_ENUMERATION, MSR_VIRTUAL_MITIGATION_ENUM, MSR_VIRTUAL_MITIGATION_CTRL) == (
        0x50000000, 0x50000001, 0x50000002)
    assert bits.MitigationCtrl.BHB_CLEAR_SEQ_S_USED == 1 and bits.MitigationCtrl.RETPOLINE_S_USED == 2
    assert bits.MitigationEnum.BHB_CLEAR_SEQ_S_SUPPORT == 1 and bits.MitigationEnum.RETPOLINE_S_SUPPORT == 2
    assert bits.AmdCpuid80000021Eax.AUTOIBRS == 1 << 8 and bits.AmdCpuid80000008Ebx.BTC_NO == 1 << 29
    assert min(KVM_MSRS_TAKEN) == 0x4B564D00 and max(KVM_MSRS_TAKEN) == 0x4B564D08


def test_every_bit_has_a_source_comment() -> None:
    """Each member line of bits.py ends in a comment naming where the bit comes from."""
    src = (Path(bits.__file__)).read_text()
    members = re.findall(r"^    ([A-Z0-9_]+) = 1 << \d+(.*)$", src, re.MULTILINE)
    assert len(members) > 80
    for name, rest in members:
        assert re.search(r"#\s*\S+", rest), f"{name} has no source comment"


def test_no_two_members_of_a_register_share_a_bit() -> None:
    for reg in REGISTERS.values():
        values = [int(m) for m in reg.layout]
        assert len(values) == len(set(values)), reg.name
        assert all(v and v & (v - 1) == 0 for v in values), f"{reg.name} has a member that is not one bit"


@pytest.mark.parametrize("key", sorted(REGISTERS))
@given(data=st.data())
def test_decode_encode_round_trips_every_value(key: str, data: st.DataObject) -> None:
    reg = REGISTERS[key]
    value = data.draw(st.integers(0, reg.mask))
    d = decode(reg, value)
    assert encode(reg, d.names, d.unknown) == value
    assert d.unknown & sum(int(m) for m in reg.layout) == 0


def test_unknown_bits_are_kept_and_shown() -> None:
    d = decode(register("spec_ctrl"), 0x841)
    assert d.names == ("IBRS", "RRSBA_DIS_S") and d.unknown == 0x800
    assert str(d) == "IBRS|RRSBA_DIS_S|unknown(0x800)"
    assert d.to_json() == {"value": "0x841", "bits": ["IBRS", "RRSBA_DIS_S"], "unknown": "0x800"}
    assert str(decode(register("spec_ctrl"), 0)) == "0"


def test_decode_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        decode(register("cpuid_7_2_edx"), 1 << 32)
    with pytest.raises(ValueError):
        decode(register("spec_ctrl"), -1)
    with pytest.raises(KeyError, match="no bit named 'NOPE'"):
        encode(register("spec_ctrl"), ["NOPE"])
    with pytest.raises(KeyError, match="unknown register"):
        register("msr_nope")


def test_register_locations_read_naturally() -> None:
    assert register("spec_ctrl").location == "MSR 0x48"
    assert register("cpuid_7_2_edx").location == "CPUID.(EAX=0x7,ECX=2).EDX"


# --- QEMU's and libvirt's names (x86/data/feature_names.toml: the one table the pool emitter and the libvirt
# reader share) ---------------------------------------------------------------------------------------------------

NAMES_TOML = Path(__file__).resolve().parent.parent / "src/pvmit/x86/data/feature_names.toml"
VMM_NAMES = Path(__file__).parent / "fixtures" / "vmm_names"


def test_every_name_maps_to_an_existing_register_bit() -> None:
    table = feature_names()
    assert len(table.features) >= 50
    for f in table.features:
        assert REGISTERS[f.register.key] is f.register and f.register.bit(f.bit) == f.mask, f.name
        for n in (f.name, *f.aliases):
            assert table.get(n) is f and table.of_bit(f.register.key, f.bit) is f, n
        for ref in (f.source, f.not_in_libvirt or f.source):
            assert ref.partition(":")[0] in table.sources and table.cite(ref) != ref, (f.name, ref)
    assert table.canonical(["md_clear", "arch_capabilities", "fpu"]) == {"md-clear", "arch-capabilities", "fpu"}


def test_every_pool_bit_has_its_names_or_a_reason_for_none() -> None:
    """Each bit `pvmit pool` decides or leaves is named (QEMU's name, libvirt's or why libvirt has none yet) or is
    listed as unnamed with the reason; never both, never neither."""
    from pvmit.pool.rule import pool_bit_table

    table = feature_names()
    named = unnamed = 0
    for b in pool_bit_table():
        f, why = table.of_bit(b.register.key, b.name), table.why_unnamed(b.register.key, b.name)
        assert (f is None) != (why is None), f"{b.key}: named {f} and unnamed because {why!r}"
        if f is not None:
            assert (b.qemu, b.libvirt) == (f.name, "" if f.not_in_libvirt else f.name), b.key
            named += 1
        else:
            assert why and why.partition(":")[0] in table.sources and (b.qemu, b.libvirt) == ("", ""), b.key
            unnamed += 1
    assert named >= 50 and unnamed >= 20


def test_the_names_and_their_absence_are_the_tools_own() -> None:
    """Against QEMU's and libvirt's trees (tests/fixtures/vmm_names, the sources qemu-tree and libvirt-tree): each
    name is QEMU's for its bit; libvirt defines it there unless the entry says it does not; an unnamed bit has no
    name in either."""
    qemu, libvirt = (json.loads((VMM_NAMES / f).read_text())["words"]
                     for f in ("qemu_feature_names.json", "libvirt_cpu_map.json"))
    table = feature_names()
    for f in table.features:
        bit = str(f.mask.bit_length() - 1)
        assert qemu[f.register.key].get(bit) == f.name, f.name
        assert libvirt.get(f.register.key, {}).get(bit) == (None if f.not_in_libvirt else f.name), f.name
    for u in table.unnamed:
        for name in u.bits:
            bit = str(u.register.bit(name).bit_length() - 1)
            assert bit not in qemu[u.register.key] and bit not in libvirt.get(u.register.key, {}), name


@pytest.mark.parametrize("change, message", [
    (lambda d: d["feature"][2].update(bit="NOPE"), "NOPE"),
    (lambda d: d["feature"][2].update(not_in_libvirt="nowhere: x"), "does not start with a key"),
    (lambda d: d["feature"][2].update(qemu="x"), "expects name"),
    (lambda d: d["unnamed"][0]["bits"].append("MD_CLEAR"), "MD_CLEAR"),
    (lambda d: d["unnamed"][0]["bits"].append("RDCL_NO"), "named by a feature"),
    (lambda d: d["unnamed"][1]["bits"].append(d["unnamed"][1]["bits"][0]), "twice"),
    (lambda d: d["unnamed"][0].update(why="because"), "does not start with a key"),
    (lambda d: d["unnamed"][0].update(register="spec_ctrl"), "register"),
])
def test_a_wrong_names_table_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    doc = tomllib.loads(NAMES_TOML.read_text())
    change(doc)
    with pytest.raises(ValueError, match=message):
        parse_feature_names(doc, "test")
