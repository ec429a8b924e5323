"""The model of Linux's spectre_v2 and BHI choice, and the sysfs parser."""

from __future__ import annotations

import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.errors import InputError
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.linux.model import Cmdline, predict
from pvmit.linux.spectre_v2 import Bhi, V2Mode, parse_spectre_v2


def test_cmdline_parsing() -> None:
    c = Cmdline.parse("quiet spectre_v2=retpoline spectre_bhi=vmexit retbleed=off")
    assert (c.spectre_v2, c.spectre_bhi, c.retbleed, c.mitigations_off) == ("retpoline", "vmexit", "off", False)
    assert Cmdline.parse("nospectre_v2").spectre_v2 == "off"
    assert Cmdline.parse("mitigations=off").mitigations_off
    assert str(Cmdline.parse("spectre_v2=eibrs,retpoline")) == "spectre_v2=eibrs,retpoline"
    with pytest.raises(InputError, match="spectre_v2='bogus'"):
        Cmdline.parse("spectre_v2=bogus")
    with pytest.raises(InputError, match="spectre_bhi='maybe'"):
        Cmdline.parse("spectre_bhi=maybe")


def test_guest_on_a_part_without_eibrs_uses_retpoline_and_relies_on_it(catalog: Catalog) -> None:
    p = predict(catalog.get("icelake-sp").facts, Cmdline.parse("spectre_v2=retpoline"))
    assert p.mode is V2Mode.RETPOLINE and p.bhi is Bhi.RETPOLINE  # ICX shows no RRSBA: rrsba_disabled
    assert p.relies_on == {Mitigation.RETPOLINE}


def test_retpoline_guest_shown_rrsba_with_control_disables_it_itself(catalog: Catalog) -> None:
    p = predict(catalog.get("sapphirerapids").facts, Cmdline.parse("spectre_v2=retpoline"))
    assert p.sets_rrsba_dis_s and p.bhi is Bhi.RETPOLINE and p.relies_on == {Mitigation.RETPOLINE}


def test_retpoline_guest_shown_rrsba_without_control_falls_back_to_the_loop(catalog: Catalog) -> None:
    p = predict(catalog.get("cascadelake-sp").facts, Cmdline.parse("spectre_v2=eibrs,retpoline"))
    assert p.mode is V2Mode.EIBRS_RETPOLINE and not p.sets_rrsba_dis_s
    assert p.bhi is Bhi.SW_LOOP and p.relies_on == {Mitigation.RETPOLINE, Mitigation.BHB_SHORT}


def test_eibrs_request_without_eibrs_falls_back_to_auto(catalog: Catalog) -> None:
    p = predict(catalog.get("haswell-ep").facts, Cmdline.parse("spectre_v2=eibrs"))
    assert p.mode is V2Mode.RETPOLINE and "falls back" in p.reason


def test_fallbacks_to_auto_keep_the_retbleed_switch(catalog: Catalog) -> None:
    skx = catalog.get("skylake-sp").facts
    p = predict(skx, Cmdline.parse("spectre_v2=eibrs"))  # no eIBRS: AUTO, and AUTO on Skylake means IBRS
    assert (p.mode, p.bhi) == (V2Mode.IBRS, Bhi.SW_LOOP) and "falls back" in p.reason


def test_ibrs_requested_on_an_eibrs_part_is_kept(catalog: Catalog) -> None:
    p = predict(catalog.get("cascadelake-sp").facts, Cmdline.parse("spectre_v2=ibrs"))
    assert p.mode is V2Mode.IBRS and "kept" in p.reason
    amd = predict(catalog.get("epyc-milan").facts, Cmdline.parse("spectre_v2=ibrs"))
    assert amd.mode is V2Mode.RETPOLINE and "Intel" in amd.reason


def test_lfence_is_serializing_on_every_vendor(catalog: Catalog) -> None:
    """init_amd sets X86_FEATURE_LFENCE_RDTSC on every CPU with SSE2, whatever CPUID 0x80000021 says: Debian's
    6.1.192 kernel on QEMU's EPYC-Rome printed LFENCE (the Linux oracle, case epyc-rome:retpoline-lfence)."""
    rome = predict(catalog.get("epyc-rome").facts, Cmdline.parse("spectre_v2=retpoline,lfence"))
    assert rome.mode is V2Mode.LFENCE and rome.relies_on == frozenset()
    milan = predict(catalog.get("epyc-milan").facts, Cmdline.parse("spectre_v2=retpoline,lfence"))
    assert milan.mode is V2Mode.LFENCE and milan.relies_on == frozenset()
    assert predict(catalog.get("haswell-ep").facts, Cmdline.parse("spectre_v2=retpoline,lfence")).mode is V2Mode.LFENCE


def test_bhi_state_follows_spectre_bhi_state_order(catalog: Catalog) -> None:
    icx = catalog.get("icelake-sp").facts
    # spectre_bhi=off in retpoline mode with RRSBA disabled still prints "BHI: Retpoline"
    p = predict(icx, Cmdline.parse("spectre_v2=retpoline spectre_bhi=off"))
    assert p.bhi is Bhi.RETPOLINE
    off = predict(icx, Cmdline.parse("spectre_v2=off"))
    assert (off.mode, off.bhi) == (V2Mode.NONE, Bhi.VULNERABLE)


def test_unknown_facts_are_named_as_not_shown(catalog: Catalog) -> None:
    p = predict(catalog.get("meteorlake").facts)
    assert "unknown, so not shown: arch_capabilities.RRSBA" in p.reason


def test_retbleed_parts_get_ibrs_unless_retbleed_off(catalog: Catalog) -> None:
    skx = catalog.get("skylake-sp").facts
    assert predict(skx).mode is V2Mode.IBRS
    assert predict(skx, Cmdline.parse("retbleed=off")).mode is V2Mode.RETPOLINE
    assert predict(skx, Cmdline.parse("spectre_v2=retpoline")).mode is V2Mode.RETPOLINE


def test_bhi_options_and_bare_metal(catalog: Catalog) -> None:
    clx = catalog.get("cascadelake-sp").facts
    assert predict(clx, Cmdline.parse("spectre_bhi=off")).bhi is Bhi.VULNERABLE
    assert predict(clx, Cmdline.parse("spectre_bhi=vmexit")).bhi is Bhi.VMEXIT_ONLY
    assert predict(clx, Cmdline.parse("mitigations=off")).mode is V2Mode.NONE
    skx = catalog.get("skylake-sp").facts
    assert predict(skx, hypervisor=True).bhi is Bhi.SW_LOOP  # any Intel guest gets X86_BUG_BHI
    assert predict(skx, hypervisor=False).bhi is Bhi.NOT_AFFECTED  # bare metal needs eIBRS
    cwf = catalog.get("clearwaterforest").facts
    assert predict(cwf, hypervisor=False).bhi is Bhi.BHI_DIS_S  # current kernels ignore BHI_NO
    before = Kernel(KernelVersion(6, 12, 28))  # 9f725eec8fc0 reached 6.12 in 6.12.29
    assert predict(cwf, hypervisor=False, kernel=before).bhi is Bhi.NOT_AFFECTED
    assert "arch_capabilities.BHI_NO" in predict(cwf, hypervisor=False, kernel=before).trusts


def test_amd_is_not_affected_by_bhi_and_autoibrs_counts_as_eibrs(catalog: Catalog) -> None:
    assert predict(catalog.get("epyc-genoa").facts).mode is V2Mode.EIBRS
    p = predict(catalog.get("epyc-rome").facts)
    assert p.mode is V2Mode.RETPOLINE and p.bhi is Bhi.NOT_AFFECTED and p.relies_on == {Mitigation.RETPOLINE}


@pytest.mark.parametrize("line,mode,bhi", [
    ("Mitigation: Retpolines; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Not affected",
     V2Mode.RETPOLINE, Bhi.NOT_AFFECTED),
    ("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; "
     "BHI: BHI_DIS_S", V2Mode.EIBRS, Bhi.BHI_DIS_S),
    ("Mitigation: Enhanced IBRS, IBPB: conditional, RSB filling, PBRSB-eIBRS: SW sequence; BHI: SW loop, "
     "KVM: SW loop", V2Mode.EIBRS, Bhi.SW_LOOP),
    ("Mitigation: Full generic retpoline, IBPB: conditional, IBRS_FW, STIBP: disabled, RSB filling",
     V2Mode.RETPOLINE, Bhi.NOT_REPORTED),
    ("Mitigation: Enhanced IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; BHI: SW loop, "
     "KVM: SW loop", V2Mode.EIBRS, Bhi.SW_LOOP),
    ("Mitigation: Enhanced / Automatic IBRS + Retpolines; IBPB: conditional; RSB filling; BHI: Retpoline",
     V2Mode.EIBRS_RETPOLINE, Bhi.RETPOLINE),
    ("Mitigation: IBRS; IBPB: conditional; STIBP: conditional; RSB filling; PBRSB-eIBRS: Not affected",
     V2Mode.IBRS, Bhi.NOT_REPORTED),
    ("Vulnerable; IBPB: disabled; STIBP: disabled; PBRSB-eIBRS: Not affected; BHI: Vulnerable",
     V2Mode.NONE, Bhi.VULNERABLE),
    ("Mitigation: Retpolines; BHI: Something new", V2Mode.RETPOLINE, Bhi.UNKNOWN),
])
def test_parse_sysfs_lines(line: str, mode: V2Mode | None, bhi: Bhi) -> None:
    s = parse_spectre_v2(line)
    assert (s.mode, s.bhi) == (mode, bhi)
