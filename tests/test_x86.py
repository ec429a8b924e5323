"""Bit layouts and lossless decoding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvmit.x86 import REGISTERS, bits, decode, encode, register
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
