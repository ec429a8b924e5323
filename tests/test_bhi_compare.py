"""The comparison of the four BHI policies (pvmit.interface.bhi_compare, which `pvmit bench bhi` and docs/bhi.md
report) at the level test_bhi.py leaves open: what each summary field counts, which placement counts as forced or
protected, what a placement records, which scenarios run, and the policies' own descriptions as JSON."""

from __future__ import annotations

import dataclasses
import re

from conftest import REPO

from pvmit.catalog.loader import Catalog
from pvmit.interface.bhi import BhiPolicy
from pvmit.interface.bhi_compare import (
    Placement,
    ScenarioResult,
    compare,
    guest_kinds,
    newer_generation,
    run_scenario,
    scenario_pools,
)
from pvmit.linux.bhb import BhbChoice
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.linux.spectre_v2 import Bhi
from pvmit.safety.reference_rules import synthetic

LEAVING = [p for p in BhiPolicy if not p.forces_bhi_dis_s]


def kind(name: str) -> object:
    return next(k for k in guest_kinds() if k.id == name)


def test_a_summary_counts_what_it_says() -> None:
    short, long, none = (BhbChoice(Bhi.SW_LOOP, loop, False, loop) for loop in ("short", "long", "none"))
    placements = [
        Placement("b", "h1", long, True, False, False, True, False, "long"),
        Placement("a", "h1", short, True, True, False, False, True, "forced"),
        Placement("a", "h2", short, False, True, False, False, False, "refused, forced elsewhere"),
        Placement("b", "h2", long, True, False, False, False, False, "long"),
        Placement("c", "h2", none, True, False, True, False, False, "exposed"),
        Placement("c", "h1", none, False, False, False, False, False, "refused"),
    ]
    r = ScenarioResult(BhiPolicy.LONG_NEEDED_BIT, "mixed", ("h1",), ("h1", "h2"), True, placements)
    assert r.summary() == {
        "policy": "long-needed-bit", "scenario": "mixed", "boot_pool": ["h1"], "hosts": ["h1", "h2"],
        "long_bhb_needed_shown": True, "guests": 3, "placements": 6,
        "guests_exposed": ["c"], "placements_exposed": 1,
        "placements_forced": 1,  # of the accepted placements only
        "guests_forced": ["a"], "guests_long_loop": ["b"], "placements_long_needless": 1,
        "guests_paying_bhi_dis_s_averse": ["a"], "placements_refused": 2, "guests_refused": ["a", "c"]}
    empty = ScenarioResult(BhiPolicy.CMDLINE_LONG, "pre", (), (), None).summary()
    assert (empty["guests"], empty["placements"], empty["guests_refused"]) == (0, 0, [])


def test_only_bhi_dis_s_counts_as_forced(catalog: Catalog) -> None:
    """A Skylake-shown guest relies on retpoline too: on Sapphire Rapids the VMM forces RRSBA_DIS_S for it, which is
    not what the table's "forced" column counts (BHI_DIS_S); under (a) BHI is left to the guest."""
    pool = [catalog.get("skylake-sp"), catalog.get("sapphirerapids")]
    r = run_scenario(BhiPolicy.LONG_UNDER_HYPERVISOR, "skx+spr", pool, pool[1:], [kind("linux-6.1")])
    (p,) = r.placements
    assert p.accepted and not p.forced and not p.pays_bhi_dis_s and p.exposed
    d = run_scenario(BhiPolicy.FORCE_BHI_DIS_S, "skx+spr", pool, pool[1:], [kind("linux-6.1")]).placements[0]
    assert d.accepted and d.forced and not d.exposed


def test_a_placement_records_its_host_and_why(catalog: Catalog) -> None:
    pre, post = scenario_pools(catalog)["grown"]
    r = run_scenario(BhiPolicy.LONG_NEEDED_BIT, "grown", pre, post, [kind("linux-6.1")])
    assert [p.host for p in r.placements] == [m.id for m in post]
    refused = [p for p in r.placements if not p.accepted]
    assert refused
    for p in refused:  # the promise and the bit, both given
        assert p.reason.startswith("the VM was promised short BHB-clearing sequence support (MITIGATION_ENUM bit 0)")
        assert "; the VM was shown LONG_BHB_NEEDED = 0 at boot" in p.reason
    accepted = [p for p in r.placements if p.accepted]
    assert accepted and all(p.reason == p.choice.reason == "the short loop" for p in accepted)


def test_the_guests_kernel_picks_its_loop(catalog: Catalog) -> None:
    """A 5.10 kernel, shown eIBRS, reports no BHI mitigation and runs no loop: exposed on every pre-Alder Lake
    host, where a current kernel runs the short loop and is protected."""
    pre, _ = scenario_pools(catalog)["pre"]
    old = dataclasses.replace(kind("linux-6.18"), id="linux-5.10", kernel=Kernel(KernelVersion.parse("5.10.0")))
    r = run_scenario(BhiPolicy.FORCE_BHI_DIS_S, "pre", pre, pre, [old, kind("linux-6.18")])
    by_guest = {g: [p for p in r.placements if p.guest == g] for g in ("linux-5.10", "linux-6.18")}
    assert all(p.choice.loop == "none" and p.accepted and p.exposed for p in by_guest["linux-5.10"])
    assert by_guest["linux-5.10"][0].reason == "BHI: not reported: no BHB-clearing loop on kernel entry"
    assert all(p.choice.loop == "short" and not p.exposed for p in by_guest["linux-6.18"])


def test_a_guest_that_sets_bhi_dis_s_itself_reports_no_short_loop(catalog: Catalog) -> None:
    """Shown BHI_CTRL (the post pool), Linux sets BHI_DIS_S itself and runs no loop: the agent reports nothing, so
    the VMM forces nothing for it even under (d)."""
    s = {r.scenario: r for r in compare(catalog, [BhiPolicy.FORCE_BHI_DIS_S])}["post"]
    agent = [p for p in s.placements if p.guest == "linux-6.12+agent"]
    assert agent and all(p.choice.own_bhi_dis_s and p.accepted and not p.forced for p in agent)
    assert s.summary()["placements_forced"] == 0 and s.summary()["guests_forced"] == []


def test_compare_runs_the_scenarios_that_have_hosts(catalog: Catalog) -> None:
    """Only scenarios with a boot pool and hosts run; the guest kinds given are the only ones placed."""
    pools = scenario_pools(catalog)
    pre_ids, post_ids = {m.id for m in pools["pre"][0]}, {m.id for m in pools["post"][0]}
    only_pre = dataclasses.replace(catalog, models=tuple(m for m in catalog if m.id not in post_ids))
    only_post = dataclasses.replace(catalog, models=tuple(m for m in catalog if m.id not in pre_ids))
    one = [kind("linux-6.18")]
    assert [r.scenario for r in compare(only_pre, [BhiPolicy.CMDLINE_LONG], one)] == ["pre", "mixed"]
    assert [r.scenario for r in compare(only_post, [BhiPolicy.CMDLINE_LONG], one)] == ["post", "mixed"]
    results = compare(catalog, [BhiPolicy.FORCE_BHI_DIS_S], one)
    assert [r.scenario for r in results] == ["pre", "post", "mixed", "grown"]
    assert {p.guest for r in results for p in r.placements} == {"linux-6.18"}


def test_pools_oldest_first(catalog: Catalog) -> None:
    pre, _ = scenario_pools(catalog)["mixed"]
    assert [(m.year, m.id) for m in pre] == sorted((m.year or 9999, m.id) for m in pre)
    assert [m.id for m in pre][:3] == ["cascadelake-sp", "cooperlake", "icelake-sp"]


def test_newer_generation_is_bhi_ctrl_bhi_no_or_the_longer_history(catalog: Catalog) -> None:
    """Alder Lake or newer: BHI_CTRL, or BHI_NO, or the longer history (an unknown answer counts as newer)."""
    facts = dict(synthetic(("intel", "amd"), inferred=False))

    def label(vendor: str, bhi_no: str, bhi_ctrl: str) -> str:
        return (f"synthetic {vendor} EIBRS=1 RSBA=0 RRSBA=0 BHI_NO={bhi_no} RRSBA_CTRL=0 BHI_CTRL={bhi_ctrl} "
                f"RETBLEED=0")

    assert newer_generation(facts[label("intel", "1", "0")]), "BHI_NO alone (not affected, short history)"
    assert newer_generation(facts[label("intel", "1", "1")])
    assert newer_generation(facts[label("intel", "0", "1")])
    assert newer_generation(facts[label("intel", "unknown", "unknown")]), "unknown: the longer history assumed"
    assert not newer_generation(facts[label("intel", "0", "0")])
    assert newer_generation(facts[label("amd", "0", "1")]), "BHI_CTRL alone, where the history is never long"
    assert not newer_generation(facts[label("amd", "unknown", "unknown")])
    assert newer_generation(catalog.get("clearwaterforest").facts) and not newer_generation(
        catalog.get("icelake-sp").facts)


def test_docs_table_is_the_comparison_now(catalog: Catalog) -> None:
    """The pool columns of docs/bhi.md's table (written by `pvmit bench bhi`) are what compare() gives now."""
    from pvmit.bench.bhi import _pool_cell

    text = (REPO / "docs/bhi.md").read_text()
    rows = {m[1]: m[2].split(" | ")[-4:] for m in re.finditer(r"^\| \((\w)\) [^|]+ \| (.*) \|$", text, re.M)}
    assert sorted(rows) == ["a", "b", "c", "d"]
    now = {(r.policy.letter, r.scenario): _pool_cell(r.summary()) for r in compare(catalog)}
    for letter, cells in rows.items():
        assert cells == [now[(letter, s)] for s in ("pre", "post", "mixed", "grown")], letter


def test_each_policy_describes_itself_as_json() -> None:
    for p in BhiPolicy:
        t = p.definition
        assert t.to_json() == {"shown": t.shown, "guest_must": t.guest_must, "vmm_forces": t.vmm_forces,
                               "left_exposed": t.exposed, "pays": t.pays}
    assert BhiPolicy.LONG_NEEDED_BIT.definition.to_json()["guest_must"] == "run the long loop when shown the bit"
