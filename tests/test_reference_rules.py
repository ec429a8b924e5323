"""The independent statement of the derivation rules (pvmit.safety.reference_rules): its tables are complete, it
agrees with pvmit.derive on every catalog model and on every combination of the deciding bits, and a wrong
derivation makes `pvmit verify` fail with both answers shown."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pvmit.derive as derive
from pvmit.catalog.facts import CpuFacts, RegisterFacts
from pvmit.catalog.loader import Catalog
from pvmit.derive import Finding
from pvmit.safety import reference_rules as ref
from pvmit.safety.verify import Tally, check_derivation, derivation_disagreements, verify
from pvmit.x86.registers import REGISTERS


def facts(vendor: str = "intel", **bits: str) -> CpuFacts:
    """Only the named deciding bits described: "1", "0", "1i"/"0i" (inferred)."""
    regs: dict[str, list[int]] = {}
    for name, state in bits.items():
        register, bit = ref.BITS[name]
        v = regs.setdefault(register, [0, 0, 0])
        v[1] |= 1 << bit
        v[0] |= (1 << bit) if state.startswith("1") else 0
        v[2] |= (1 << bit) if state.endswith("i") else 0
    return CpuFacts(vendor, 6, 0x8F, None, {  # type: ignore[arg-type]
        k: RegisterFacts(REGISTERS[k], v, kn, {"*": "test"}, "test", inf) for k, (v, kn, inf) in regs.items()})


def test_tables_are_complete_and_have_no_dead_rows() -> None:
    assert ref.check_tables() == []


def test_the_reference_shares_no_code_with_derive() -> None:
    tree = ast.parse(Path(ref.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m.startswith("pvmit.derive") or m.startswith("pvmit.interface")
                                              or m == "pvmit.x86.bits")}, imported


def test_bit_numbers_are_the_architectural_ones() -> None:
    """msr-index.h ARCH_CAP_IBRS_ALL BIT(1), ARCH_CAP_RSBA BIT(2), ARCH_CAP_RRSBA BIT(19), ARCH_CAP_BHI_NO BIT(20);
    CPUID.(7,2).EDX RRSBA_CTRL bit 2, BHI_CTRL bit 4 - and pvmit.x86 names them the same."""
    for name, (register, bit) in ref.BITS.items():
        assert REGISTERS[register].bit(ref.CATALOG_NAMES.get(name, name)) == 1 << bit, name


@pytest.mark.parametrize("bits,mitigation,effective,can_force,assumed", [
    ({"RRSBA": "1", "EIBRS": "1", "RRSBA_CTRL": "1"}, "retpoline", False, True, False),
    ({"RRSBA": "1i", "EIBRS": "1", "RRSBA_CTRL": "0"}, "retpoline", False, False, False),  # inferred 1 counts
    ({"RRSBA": "0i", "EIBRS": "1", "RRSBA_CTRL": "1"}, "retpoline", False, True, True),    # inferred 0 does not
    ({"RRSBA": "0", "EIBRS": "1", "RETBLEED": "0"}, "retpoline", True, False, True),  # control unknown: assumed absent
    ({"RRSBA": "0", "EIBRS": "1i"}, "retpoline", False, False, True),  # inferred eIBRS never counts
    ({"RSBA": "1", "EIBRS": "0", "RRSBA_CTRL": "1"}, "retpoline", False, False, False),  # RRSBA_DIS_S: RRSBA only
    ({"RSBA": "1", "RRSBA": "1", "EIBRS": "0", "RRSBA_CTRL": "1"}, "retpoline", False, True, False),
    ({"RSBA": "0", "EIBRS": "0", "RETBLEED": "0"}, "retpoline", True, False, True),
    ({"RSBA": "0", "EIBRS": "0"}, "retpoline", False, False, True),  # unknown RETBLEED listing
    ({"RRSBA": "0", "EIBRS": "1", "RETBLEED": "1", "RRSBA_CTRL": "1"}, "retpoline", False, False, False),  # RKL
    ({"RRSBA": "0", "EIBRS": "1", "RETBLEED": "1i"}, "retpoline", False, False, True),
    ({"RRSBA": "0", "EIBRS": "1", "RETBLEED": "0i"}, "retpoline", False, False, True),
    ({"EIBRS": "0"}, "retpoline", False, False, True),
    ({"BHI_CTRL": "1"}, "bhb-short", False, True, False),
    ({"BHI_CTRL": "1i"}, "bhb-short", False, False, True),  # counts for the answer, not for the control
    ({"BHI_CTRL": "0i"}, "bhb-short", False, False, True),
    ({"BHI_CTRL": "1", "BHI_NO": "1"}, "bhb-short", True, True, False),
    ({"BHI_CTRL": "1", "BHI_NO": "1i"}, "bhb-short", False, True, False),
    ({"BHI_CTRL": "0", "BHI_NO": "0i"}, "bhb-short", True, False, False),
])
def test_reference_answers_on_hand_made_facts(bits: dict[str, str], mitigation: str, effective: bool,
                                              can_force: bool, assumed: bool) -> None:
    e = ref.expected(facts(**bits), mitigation)
    assert (e.effective, e.can_force, e.assumed) == (effective, can_force, assumed), e.why


def test_amd_and_hygon() -> None:
    for vendor in ("amd", "hygon"):
        for m in ("retpoline", "bhb-short"):
            e = ref.expected(facts(vendor, RRSBA="1", BHI_CTRL="1", RRSBA_CTRL="1"), m)
            assert e.effective and not e.control_exists and not e.can_force


def test_derive_agrees_on_every_catalog_model(catalog: Catalog) -> None:
    problems = {m.id: derivation_disagreements(m.facts) for m in catalog}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_derive_agrees_on_every_combination_of_the_deciding_bits() -> None:
    tally = Tally()
    check_derivation(ref.synthetic(), tally)
    assert tally.derivations == 5 ** len(ref.BITS) + 2 * 3 ** len(ref.BITS)
    assert not tally.violations, [(v.source, v.detail) for v in tally.violations[:5]]


def wrong_retpoline(cpu: CpuFacts, real=derive.retpoline_effective) -> Finding:  # type: ignore[no-untyped-def]
    """The mutation the issue tried: retpoline effective on eIBRS parts whose RRSBA is unknown."""
    f = real(cpu)
    if f.assumed == ("arch_capabilities.RRSBA",):
        return Finding(True, "mutated: eIBRS part, RRSBA unknown, taken as effective")
    return f


def wrong_control(cpu: CpuFacts, control, real=derive.control_available) -> Finding:  # type: ignore[no-untyped-def]
    """Another: a control whose enumeration is unknown taken as present."""
    f = real(cpu, control)
    return Finding(True, "mutated: assumed present") if f.assumed else f


def test_a_wrong_derivation_fails_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derive, "retpoline_effective", wrong_retpoline)
    tally = verify([], ["sierraforest", "icelake-sp"], jobs=1, synthetic=False)
    mine = [v for v in tally.violations if v.step == "derivation"]
    assert {v.source for v in mine} == {"sierraforest"}
    (v,) = [v for v in mine if "derive says yes" in v.detail]
    assert v.detail.startswith("retpoline effective: derive says yes (mutated: eIBRS part, RRSBA unknown")
    assert "the reference rules say no (Xen spec_ctrl.c retpoline_calculations()" in v.detail
    synthetic = Tally()
    check_derivation(ref.synthetic(("intel",), inferred=False), synthetic)
    assert synthetic.violations and all("EIBRS=1" in v.source for v in synthetic.violations)


def test_a_wrong_control_derivation_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derive, "control_available", wrong_control)
    tally = Tally()
    check_derivation(ref.synthetic(("intel",), inferred=False), tally)
    assert tally.violations and all("RRSBA_CTRL=unknown" in v.source or "BHI_CTRL=unknown" in v.source
                                    for v in tally.violations)
    assert any("exists: derive says yes (mutated: assumed present)" in v.detail for v in tally.violations)


def test_cli_verify_shows_the_derivation_check(cli) -> None:  # type: ignore[no-untyped-def]
    import json

    r = cli("verify", "--models", "icelake-sp", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["derivations_checked"] == 1 + 5 ** len(ref.BITS) + 2 * 3 ** len(ref.BITS) and doc["violations"] == 0
