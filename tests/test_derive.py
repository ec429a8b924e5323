"""Derivation rules: each rule with synthetic facts (known and unknown), then pinned answers for catalog models."""

from __future__ import annotations

import pytest

from pvmit.catalog.facts import CpuFacts, RegisterFacts
from pvmit.catalog.loader import Catalog
from pvmit.derive import (
    Mitigation,
    bhb_short_effective,
    control_available,
    mitigations_from_bits,
    mitigations_to_bits,
    need,
    retpoline_effective,
)
from pvmit.x86.bits import SpecCtrl
from pvmit.x86.registers import REGISTERS


def cpu(vendor: str = "intel", **bits: bool) -> CpuFacts:
    """Facts with only the named bits known: arch_capabilities.X=..., cpuid_7_2_edx.Y=..."""
    regs: dict[str, RegisterFacts] = {}
    for key, value in bits.items():
        reg_key, bit = key.split("__")
        reg = REGISTERS[reg_key]
        old = regs.get(reg_key) or RegisterFacts(reg)
        mask = reg.bit(bit)
        regs[reg_key] = RegisterFacts(reg, old.value | (mask if value else 0), old.known | mask,
                                      {**old.sources, bit: "test"})
    return CpuFacts(vendor, 6, 0x55, 7, regs)  # type: ignore[arg-type]


AC, C72, LB = "arch_capabilities", "cpuid_7_2_edx", "linux_blacklist"


def test_retpoline_rules() -> None:
    assert not retpoline_effective(cpu(**{f"{AC}__RRSBA": True})).answer
    assert not retpoline_effective(cpu(**{f"{AC}__RSBA": True, f"{AC}__IBRS_ALL": False})).answer
    ok = retpoline_effective(cpu(**{f"{AC}__RSBA": False, f"{AC}__IBRS_ALL": False, f"{LB}__RETBLEED": False}))
    assert ok.answer and not ok.assumed and "RSBA=0" in ok.reason
    icx = retpoline_effective(cpu(**{f"{AC}__RRSBA": False, f"{AC}__IBRS_ALL": True, f"{LB}__RETBLEED": False}))
    assert icx.answer and "without RRSBA" in icx.reason
    # unknown facts: assumed ineffective, and the answer says which facts were assumed
    unknown = retpoline_effective(cpu())
    assert not unknown.answer and unknown.assumed and "assumed" in unknown.reason
    eibrs_unknown_rrsba = retpoline_effective(cpu(**{f"{AC}__IBRS_ALL": True, f"{LB}__RETBLEED": False}))
    assert not eibrs_unknown_rrsba.answer and eibrs_unknown_rrsba.assumed == ("arch_capabilities.RRSBA",)
    no_eibrs_unknown_rsba = retpoline_effective(cpu(**{f"{AC}__IBRS_ALL": False, f"{LB}__RETBLEED": False}))
    assert not no_eibrs_unknown_rsba.answer and no_eibrs_unknown_rsba.assumed == ("arch_capabilities.RSBA",)
    assert retpoline_effective(cpu("amd")).answer
    assert retpoline_effective(cpu("amd", **{f"{LB}__RETBLEED": True})).answer  # Linux mitigates AMD's separately


def test_retbleed_listed_part_is_not_retpoline_safe_whatever_rrsba_says() -> None:
    """catalog-corrections.md: Rocket Lake (eIBRS, RRSBA=0) is RETBLEED-affected in Linux's cpu_vuln_blacklist."""
    for eibrs in (True, False):
        listed = retpoline_effective(cpu(**{f"{AC}__RRSBA": False, f"{AC}__RSBA": False, f"{AC}__IBRS_ALL": eibrs,
                                            f"{LB}__RETBLEED": True}))
        assert not listed.answer and not listed.assumed and "RETBLEED-affected" in listed.reason
        unknown = retpoline_effective(cpu(**{f"{AC}__RRSBA": False, f"{AC}__RSBA": False, f"{AC}__IBRS_ALL": eibrs}))
        assert not unknown.answer and unknown.assumed == ("linux_blacklist.RETBLEED",)
    # RRSBA_DIS_S cannot make up for it (it covers RRSBA only): an exposure wherever the guest relies on retpoline
    n = need(cpu(**{f"{AC}__RRSBA": False, f"{AC}__IBRS_ALL": True, f"{LB}__RETBLEED": True,
                    f"{C72}__RRSBA_CTRL": True}), Mitigation.RETPOLINE)
    assert n.must_force and not n.can_force and "RETBLEED" in n.available.reason
    # where RRSBA is the cause too, RRSBA_DIS_S still helps
    n = need(cpu(**{f"{AC}__RRSBA": True, f"{AC}__IBRS_ALL": True, f"{LB}__RETBLEED": True,
                    f"{C72}__RRSBA_CTRL": True}), Mitigation.RETPOLINE)
    assert n.must_force and n.can_force


def test_bhb_rules() -> None:
    assert not bhb_short_effective(cpu(**{f"{C72}__BHI_CTRL": True})).answer
    assert bhb_short_effective(cpu(**{f"{C72}__BHI_CTRL": False})).answer
    assert bhb_short_effective(cpu(**{f"{C72}__BHI_CTRL": True, f"{AC}__BHI_NO": True})).answer
    u = bhb_short_effective(cpu())
    assert not u.answer and u.assumed == ("cpuid_7_2_edx.BHI_CTRL",)
    assert bhb_short_effective(cpu("amd")).answer and "NO_BHI" in bhb_short_effective(cpu("amd")).reason


def test_control_rules() -> None:
    assert control_available(cpu(**{f"{C72}__RRSBA_CTRL": True}), SpecCtrl.RRSBA_DIS_S).answer
    assert not control_available(cpu(**{f"{C72}__RRSBA_CTRL": False}), SpecCtrl.RRSBA_DIS_S).answer
    assert control_available(cpu(**{f"{C72}__BHI_CTRL": True}), SpecCtrl.BHI_DIS_S).answer
    u = control_available(cpu(), SpecCtrl.BHI_DIS_S)
    assert not u.answer and u.assumed and "assumed absent" in u.reason
    assert not control_available(cpu("amd", **{f"{C72}__BHI_CTRL": True}), SpecCtrl.BHI_DIS_S).answer
    with pytest.raises(ValueError):
        control_available(cpu(), SpecCtrl.STIBP)


def test_rsba_cannot_be_compensated_by_rrsba_dis_s() -> None:
    n = need(cpu(**{f"{AC}__RSBA": True, f"{AC}__IBRS_ALL": False, f"{C72}__RRSBA_CTRL": True}),
             Mitigation.RETPOLINE)
    assert n.must_force and not n.can_force and "RRSBA only" in n.available.reason


def test_request_bits_round_trip() -> None:
    both = frozenset(Mitigation)
    assert mitigations_to_bits(both) == 3
    assert mitigations_from_bits(3) == both and mitigations_from_bits(0xFFFC) == frozenset()
    assert Mitigation.RETPOLINE.control is SpecCtrl.RRSBA_DIS_S and Mitigation.BHB_SHORT.control is SpecCtrl.BHI_DIS_S


# (model, retpoline effective, short BHB effective, RRSBA_DIS_S available, BHI_DIS_S available)
PINNED = [
    ("haswell-ep", True, True, False, False),
    ("skylake-sp", False, True, False, False),   # RSBA (Retbleed): Xen 'not retpoline-safe'
    ("cascadelake-sp", False, True, False, False),  # RRSBA, no RRSBA_CTRL known: exposed to retpoline users
    ("icelake-sp", True, True, False, False),    # Cooper: ICX non-RRSBA
    ("tigerlake", True, True, False, False),     # Cooper: non-RRSBA; not RETBLEED-listed
    ("rocketlake", False, True, False, False),   # RETBLEED-listed (Linux): not retpoline-safe, no control
    ("alderlake", False, False, True, True),
    ("raptorlake", False, False, True, True),
    ("sapphirerapids", False, False, True, True),
    ("emeraldrapids", False, False, True, True),
    ("graniterapids", False, False, True, True),
    ("sierraforest", False, False, True, True),  # RRSBA unknown: retpoline assumed ineffective
    ("clearwaterforest", False, True, True, True),  # BHI_NO
    ("epyc-rome", True, True, False, False),
    ("epyc-milan", True, True, False, False),
    ("epyc-genoa", True, True, False, False),
]


@pytest.mark.parametrize("model,retp,bhb,rrsba_dis,bhi_dis", PINNED)
def test_pinned_catalog_answers(catalog: Catalog, model: str, retp: bool, bhb: bool, rrsba_dis: bool,
                                bhi_dis: bool) -> None:
    f = catalog.get(model).facts
    assert retpoline_effective(f).answer is retp
    assert bhb_short_effective(f).answer is bhb
    assert control_available(f, SpecCtrl.RRSBA_DIS_S).answer is rrsba_dis
    assert control_available(f, SpecCtrl.BHI_DIS_S).answer is bhi_dis


def test_sierraforest_answer_says_it_was_assumed(catalog: Catalog) -> None:
    r = retpoline_effective(catalog.get("sierraforest").facts)
    assert r.assumed == ("arch_capabilities.RRSBA",) and r.reason.startswith("assumed ineffective")
