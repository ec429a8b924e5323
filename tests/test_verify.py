"""`pvmit verify`: the promise over the whole catalog, and proof that the checker can find a broken policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvmit.interface.policy import Decision
from pvmit.safety import verify as verify_mod
from pvmit.safety.verify import verify


def test_whole_catalog_keeps_the_promise() -> None:
    tally = verify([])
    doc = tally.to_json()
    assert doc["violations"] == 0, doc["violation_examples"]
    assert doc["pairs"] == 31 * 31 and doc["scenarios"] == doc["accepted"] + doc["refused"]
    assert doc["accepted_with_forced_controls"] > 0 and doc["refused"] > 0 and doc["operator_overrides_reported"] > 0


def test_the_checker_finds_a_policy_that_forgets_to_force(monkeypatch: pytest.MonkeyPatch) -> None:
    real = verify_mod.decide

    def forgetful(host, reliance, personality, settings) -> Decision:  # type: ignore[no-untyped-def]
        d = real(host, reliance, personality, settings)
        return Decision(d.relied, d.reported, (), d.exposures, d.notes, d.warnings, d.assumed)

    monkeypatch.setattr(verify_mod, "decide", forgetful)
    tally = verify([], ["icelake-sp", "sapphirerapids"], jobs=1)
    assert tally.violations, "a policy that never forces anything must be caught"
    v = tally.violations[0]
    assert v.destination == "sapphirerapids" and "not held, exists on this host" in v.detail


def test_the_checker_finds_a_migration_that_forgets_the_shown_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the pool rule in the migration check (state.prepare no longer refuses for shown bits): verify must see
    a Sapphire Rapids guest accepted on Cascade Lake although it was shown bits false there (PSCHANGE_MC_NO, ...)."""
    from pvmit.interface import state

    monkeypatch.setattr(state, "shown_bit_reasons", lambda personality, host: ())
    tally = verify([], ["sapphirerapids", "cascadelake-sp"], jobs=1)
    details = [v.detail for v in tally.violations if v.step == "migration"]
    assert any("accepted although the VM was shown IA32_ARCH_CAPABILITIES.PSCHANGE_MC_NO" in d for d in details), \
        details[:3]


def test_the_checker_finds_a_pool_rule_that_shows_too_much(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the pool rule itself (every bit shown): verify's pool check must say which host it is false on."""
    from pvmit.pool import rule

    real = rule._decide
    monkeypatch.setattr(rule, "_decide", lambda b, hosts, vendor: rule.BitVerdict(True, "broken") if
                        b.rule in rule.CHECKED_RULES else real(b, hosts, vendor))
    monkeypatch.setattr(rule, "_SAFE", {})
    tally = verify([], ["sapphirerapids", "cascadelake-sp"], jobs=1)
    assert any(v.step == "pool" and "false on cascadelake-sp" in v.detail for v in tally.violations)


def test_cli_verify_on_an_operator_catalog(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab = tmp_path / "lab.toml"
    lab.write_text("""
[sources.lab]
title = "lab dumps"
[[cpu]]
id = "lab-spr"
name = "Lab SPR"
vendor = "intel"
family = 6
model = 0x8f
microarchitecture = "Golden Cove"
segment = "server"
identity_source = "lab"
[cpu.arch_capabilities]
IBRS_ALL = { value = true, source = "lab" }
RRSBA = { value = true, source = "lab" }
[cpu.cpuid_7_2_edx]
RRSBA_CTRL = { value = false, source = "lab: this microcode lacks it" }
BHI_CTRL = { value = true, source = "lab" }
""")
    r = cli("--catalog", str(lab), "verify", "--models", "lab-spr,icelake-sp,sapphirerapids", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["violations"] == 0 and doc["pairs"] == 9 and doc["refused"] > 0
    r = cli("verify", "--models", "no-such-cpu")
    assert r.code == 2 and "no CPU model named" in r.stderr
