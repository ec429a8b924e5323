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


def inferred(vendor: str = "intel", **bits: bool) -> CpuFacts:
    """Like `cpu`, with every named bit only inferred (a rule for a class of parts)."""
    f = cpu(vendor, **bits)
    return CpuFacts(f.vendor, f.family, f.model, f.stepping,
                    {k: RegisterFacts(r.register, r.value, r.known, r.sources, r.unknown_reason, r.known)
                     for k, r in f.registers.items()})


LB = "linux_blacklist"

# (facts, finding function, answer, reason as it starts, text it contains, facts named as assumed): every branch of
# the three questions, with the reason an operator reads (`pvmit policy`, `pvmit catalog show`).
BRANCHES = [
    (cpu("amd"), retpoline_effective, True, "no RSBA/RRSBA on AMD (Intel behaviours, enumerated in the Intel-only "
     "IA32_ARCH_CAPABILITIES); RET speculation there (Branch Type Confusion on Zen 1/2, SRSO) is handled by Linux's "
     "separate retbleed/SRSO mitigations (untrained return thunk, IBPB), which it deploys whatever the spectre_v2 "
     "mode and which this interface does not cover", "", ()),
    (cpu(**{f"{AC}__RRSBA": True}), retpoline_effective, False,
     "RET may predict from the BTB on RSB underflow: IA32_ARCH_CAPABILITIES.RRSBA=1 [test]", "", ()),
    (cpu(**{f"{AC}__RSBA": True}), retpoline_effective, False,
     "RET may predict from the BTB on RSB underflow (Retbleed): IA32_ARCH_CAPABILITIES.RSBA=1 [test]", "", ()),
    (cpu(**{f"{LB}__RETBLEED": True, f"{AC}__RRSBA": False}), retpoline_effective, False,
     "Linux lists this part as RETBLEED-affected, so RET may predict from the BTB whatever RRSBA says: Linux "
     "cpu_vuln_blacklist.RETBLEED=1 [test]", "", ()),
    (cpu(), retpoline_effective, False, "assumed ineffective: IA32_ARCH_CAPABILITIES.IBRS_ALL=unknown",
     "RRSBA=unknown", ("arch_capabilities.IBRS_ALL", "arch_capabilities.RRSBA", "arch_capabilities.RSBA",
                       "linux_blacklist.RETBLEED")),
    (inferred(**{f"{AC}__IBRS_ALL": True, f"{AC}__RRSBA": False, f"{LB}__RETBLEED": False}), retpoline_effective,
     False, "assumed ineffective: IA32_ARCH_CAPABILITIES.IBRS_ALL=unknown [only inferred (test)]",
     "RRSBA=unknown [only inferred (test), not relied on in this direction]",
     ("arch_capabilities.IBRS_ALL", "arch_capabilities.RRSBA", "arch_capabilities.RSBA", "linux_blacklist.RETBLEED")),
    (cpu(**{f"{AC}__IBRS_ALL": True, f"{LB}__RETBLEED": False}), retpoline_effective, False,
     "assumed ineffective: IA32_ARCH_CAPABILITIES.RRSBA=unknown [no source gives this bit]; eIBRS parts have RRSBA "
     "behaviour unless shown otherwise (IA32_ARCH_CAPABILITIES.IBRS_ALL=1 [test])", "", ("arch_capabilities.RRSBA",)),
    (cpu(**{f"{AC}__IBRS_ALL": True, f"{AC}__RRSBA": False}), retpoline_effective, False,
     "assumed ineffective: Linux cpu_vuln_blacklist.RETBLEED=unknown [register not described] (a "
     "RETBLEED-affected part is not retpoline-safe whatever RRSBA says)", "", ("linux_blacklist.RETBLEED",)),
    (cpu(**{f"{AC}__IBRS_ALL": True, f"{AC}__RRSBA": False, f"{LB}__RETBLEED": False}), retpoline_effective, True,
     "eIBRS part without RRSBA behaviour, not RETBLEED-affected: IA32_ARCH_CAPABILITIES.RRSBA=0 [test], "
     "IA32_ARCH_CAPABILITIES.IBRS_ALL=1 [test], Linux cpu_vuln_blacklist.RETBLEED=0 [test]", "", ()),
    (cpu(**{f"{AC}__IBRS_ALL": False, f"{LB}__RETBLEED": False}), retpoline_effective, False,
     "assumed ineffective: IA32_ARCH_CAPABILITIES.RSBA=unknown [no source gives this bit] on a part without eIBRS",
     "", ("arch_capabilities.RSBA",)),
    (cpu(**{f"{AC}__IBRS_ALL": False, f"{AC}__RSBA": False}), retpoline_effective, False,
     "assumed ineffective: Linux cpu_vuln_blacklist.RETBLEED=unknown [register not described] (a "
     "RETBLEED-affected part is not retpoline-safe)", "", ("linux_blacklist.RETBLEED",)),
    (cpu(**{f"{AC}__IBRS_ALL": False, f"{AC}__RSBA": False, f"{LB}__RETBLEED": False}), retpoline_effective, True,
     "no RSB-underflow fallback to the BTB: IA32_ARCH_CAPABILITIES.RSBA=0 [test], IA32_ARCH_CAPABILITIES.IBRS_ALL=0 "
     "[test], Linux cpu_vuln_blacklist.RETBLEED=0 [test]", "", ()),
    (cpu("hygon"), bhb_short_effective, True,
     "HYGON is on Linux's NO_BHI list (common.c): not affected by BHI", "", ()),
    (cpu(**{f"{AC}__BHI_NO": True}), bhb_short_effective, True,
     "not affected by cross-mode BHI: IA32_ARCH_CAPABILITIES.BHI_NO=1 [test]", "", ()),
    (inferred(**{f"{AC}__BHI_NO": True, f"{C72}__BHI_CTRL": True}), bhb_short_effective, False,
     "branch history longer than the 5x5 loop clears (Alder Lake and newer): CPUID.(7,2).EDX.BHI_CTRL=1 (inferred) "
     "[test]", "", ()),
    (inferred(**{f"{C72}__BHI_CTRL": False}), bhb_short_effective, False,
     "assumed ineffective: CPUID.(7,2).EDX.BHI_CTRL=unknown [only inferred (test), not relied on in this direction]",
     "", ("cpuid_7_2_edx.BHI_CTRL",)),
    (cpu(**{f"{C72}__BHI_CTRL": False}), bhb_short_effective, True,
     "pre-Alder Lake branch history, which the 5x5 loop clears: CPUID.(7,2).EDX.BHI_CTRL=0 [test]", "", ()),
]


@pytest.mark.parametrize("facts,question,answer,reason,contains,assumed", BRANCHES)
def test_each_branch_says_why(facts: CpuFacts, question, answer: bool, reason: str, contains: str,  # type: ignore[no-untyped-def]
                              assumed: tuple[str, ...]) -> None:
    f = question(facts)
    assert (f.answer, f.assumed, f.conservative) == (answer, assumed, bool(assumed))
    assert f.reason.startswith(reason) and contains in f.reason, f.reason
    assert f.to_json() == {"answer": answer, "reason": f.reason, "assumed": list(assumed)}


def test_control_reasons() -> None:
    r = SpecCtrl.RRSBA_DIS_S
    assert control_available(cpu("amd"), r).reason == "RRSBA_DIS_S is an Intel control; AMD CPUs do not have it"
    assert control_available(cpu(**{f"{C72}__RRSBA_CTRL": True}), r).reason == \
        "RRSBA_DIS_S exists: CPUID.(7,2).EDX.RRSBA_CTRL=1 [test]"
    assert control_available(cpu(**{f"{C72}__BHI_CTRL": False}), SpecCtrl.BHI_DIS_S).reason == \
        "BHI_DIS_S does not exist: CPUID.(7,2).EDX.BHI_CTRL=0 [test]"
    guessed = control_available(inferred(**{f"{C72}__RRSBA_CTRL": True}), r)
    assert not guessed.answer and guessed.assumed == ("cpuid_7_2_edx.RRSBA_CTRL",)
    assert guessed.reason == "assumed absent: CPUID.(7,2).EDX.RRSBA_CTRL=unknown [only inferred (test), not relied " \
                             "on in this direction]"
    kept = control_available(inferred(**{f"{C72}__RRSBA_CTRL": False}), r)  # inferred absent: counts
    assert not kept.answer and not kept.assumed and kept.reason.startswith("RRSBA_DIS_S does not exist")
    with pytest.raises(ValueError, match=r"pvmit does not force <SpecCtrl.STIBP: 2>"):
        control_available(cpu(), SpecCtrl.STIBP)


def test_need_names_its_parts() -> None:
    rsba = cpu(**{f"{AC}__RSBA": True, f"{AC}__IBRS_ALL": False, f"{C72}__RRSBA_CTRL": True})
    n = need(rsba, Mitigation.RETPOLINE)
    assert (n.mitigation, n.control) == (Mitigation.RETPOLINE, SpecCtrl.RRSBA_DIS_S)
    assert n.available.reason == "RSBA (pre-eIBRS) has no IA32_SPEC_CTRL disable; RRSBA_DIS_S covers RRSBA only"
    rkl = cpu(**{f"{LB}__RETBLEED": True, f"{AC}__RRSBA": False, f"{AC}__IBRS_ALL": True, f"{C72}__RRSBA_CTRL": True})
    n = need(rkl, Mitigation.RETPOLINE)
    assert n.must_force and not n.can_force
    assert n.available.reason == ("no IA32_SPEC_CTRL control makes retpoline safe on a RETBLEED-affected part "
                                  "without RRSBA; RRSBA_DIS_S covers RRSBA only")
    both = cpu(**{f"{AC}__RSBA": True, f"{AC}__RRSBA": True, f"{C72}__RRSBA_CTRL": True})
    assert need(both, Mitigation.RETPOLINE).can_force, "RRSBA_DIS_S does cover a part that also shows RRSBA"
    b = need(cpu(), Mitigation.BHB_SHORT)
    assert (b.mitigation, b.control, b.must_force, b.can_force) == (Mitigation.BHB_SHORT, SpecCtrl.BHI_DIS_S, True,
                                                                    False)
    assert b.assumed == ("cpuid_7_2_edx.BHI_CTRL", "cpuid_7_2_edx.BHI_CTRL")


def test_cpu_summary(catalog: Catalog) -> None:
    from pvmit.derive import cpu_summary

    spr = catalog.get("sapphirerapids").facts
    doc = cpu_summary(spr)
    assert doc == {"retpoline_effective": retpoline_effective(spr).to_json(),
                   "bhb_short_effective": bhb_short_effective(spr).to_json(),
                   "controls": {"RRSBA_DIS_S": control_available(spr, SpecCtrl.RRSBA_DIS_S).to_json(),
                                "BHI_DIS_S": control_available(spr, SpecCtrl.BHI_DIS_S).to_json()}}
    assert doc["retpoline_effective"]["answer"] is False and doc["controls"]["BHI_DIS_S"]["answer"] is True
