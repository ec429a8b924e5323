"""The fleet planner: verdicts from the interface's own rules, classes collapse, per-VM answers, pools, tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from fleet_helpers import HOSTS, VMS, host, load, plan_of, vm, write_json

from pvmit.catalog.facts import CpuFacts
from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation, mitigations_to_bits
from pvmit.fleet.document import plan_document
from pvmit.fleet.generate import sample_path
from pvmit.fleet.plan import Judge, Plan, Verdict, plan
from pvmit.fleet.tables import moves_table, vms_table, write_tables
from pvmit.interface.core import VmInterface
from pvmit.interface.forms import Form, InterfaceConfig
from pvmit.interface.policy import Decision, OperatorSettings, PartialSettings, Why, decide
from pvmit.interface.state import check, snapshot


def _plan(catalog: Catalog, tmp_path: Path, hosts: list[dict[str, Any]] = HOSTS,
          vms: list[dict[str, Any]] = VMS, judge: Judge | None = None) -> Plan:
    return plan_of(catalog, write_json(tmp_path / "inv.json", hosts, vms), judge=judge)


def _dest(p: Plan, vm_name: str, host_name: str) -> tuple[Verdict, tuple[str, ...], tuple[str, ...]]:
    f = p.fleet
    i = f.vm_names.to_pylist().index(vm_name)
    j = f.host_class[f.host_names.index(host_name)]
    m = p.moves[int(p.move_of[f.vm_class[i], j])]
    assert Verdict(int(p.verdict[f.vm_class[i], j])) is m.verdict
    return m.verdict, m.forced, m.reasons


def test_retpoline_guest_safe_on_icx_forced_on_spr_exposed_on_clx(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    assert _dest(p, "rp-1", "icx-2")[0] is Verdict.SAFE
    verdict, forced, reasons = _dest(p, "rp-1", "spr-1")
    assert verdict is Verdict.FORCED and forced == ("RRSBA_DIS_S",)
    assert "retpoline is ineffective here" in reasons[0]
    verdict, forced, reasons = _dest(p, "rp-1", "clx-1")
    assert verdict is Verdict.EXPOSED and forced == ()
    assert any("retpoline is ineffective here" in r for r in reasons)
    assert any("promised retpoline support" in r for r in reasons)  # its MITIGATION_ENUM came from ICX+SPR
    # it was shown CPUID.(7,2).EDX.PSFD on Ice Lake, which Cascade Lake does not have (the pool rule)
    assert any("shown CPUID.(7,2).EDX.PSFD" in r for r in reasons)
    # an Intel guest's shown bits are not kept on an AMD host
    verdict, _, reasons = _dest(p, "rp-1", "milan-1")
    assert verdict is Verdict.EXPOSED and any("AMD" in r and "IA32_ARCH_CAPABILITIES" in r for r in reasons)


def test_short_bhb_loop_guest_forces_bhi_dis_s_on_spr(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    assert _dest(p, "bhb-1", "spr-1")[:2] == (Verdict.FORCED, ("BHI_DIS_S",))
    for h in ("icx-1", "clx-2"):
        assert _dest(p, "bhb-1", h)[0] is Verdict.SAFE
    assert _dest(p, "bhb-1", "milan-1")[0] is Verdict.EXPOSED  # shown Intel bits an AMD host cannot keep


def test_unenlightened_vm_is_decided_with_decide_none(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    # assume-worst (the default): a Cascade Lake guest probably uses the short loop, so SPR forces BHI_DIS_S
    guess = decide(catalog.get("sapphirerapids").facts, None, catalog.get("cascadelake-sp").facts)
    assert [f.control.name for f in guess.forced] == ["BHI_DIS_S"]
    verdict, forced, reasons = _dest(p, "old-1", "spr-1")
    assert (verdict, forced) == (Verdict.FORCED, ("BHI_DIS_S",)) and "assumed from the boot personality" in reasons[0]
    # trust: nothing forced, safe, with the policy's warning
    trusting = [dict(v, unreported="trust") if v["name"] == "old-1" else v for v in VMS]
    p = _plan(catalog, tmp_path, vms=trusting)
    verdict, forced, _ = _dest(p, "old-1", "spr-1")
    assert (verdict, forced) == (Verdict.SAFE, ())
    f = p.fleet
    m = p.moves[int(p.move_of[f.vm_class[f.vm_names.to_pylist().index("old-1")], f.host_class[2]])]
    assert any("operator trusts it" in w for w in m.warnings)


def test_promise_alone_makes_a_host_exposed(catalog: Catalog, tmp_path: Path) -> None:
    """An AMD guest that relies on nothing was promised both bits (its cluster can honour them): Cascade Lake
    cannot honour retpoline, so `check` would refuse it there."""
    p = _plan(catalog, tmp_path)
    verdict, _, reasons = _dest(p, "amd-1", "clx-1")
    assert verdict is Verdict.EXPOSED and any("promised" in r for r in reasons)
    # on Sapphire Rapids the promise holds (forceable there), but the AMD bits it was shown do not
    verdict, _, reasons = _dest(p, "amd-1", "spr-1")
    assert verdict is Verdict.EXPOSED and not any("promised" in r for r in reasons)
    assert all("was shown CPUID.8000002" in r or "was shown CPUID.80000008" in r for r in reasons)


def test_supported_defaults_to_the_cluster_and_explicit_values_are_used(catalog: Catalog, tmp_path: Path) -> None:
    f = load(catalog, write_json(tmp_path / "inv.json", HOSTS, VMS + [
        vm("rp-2", "icx-1", "icelake-server-v2", "retpoline", supported="retpoline"),
        vm("old-2", "clx-1", "Cascadelake-Server", "unenlightened", form="kvm")]))
    by_name = dict(zip(f.vm_names.to_pylist(), (f.vm_classes[int(c)] for c in f.vm_class), strict=True))
    both = mitigations_to_bits({Mitigation.RETPOLINE, Mitigation.BHB_SHORT})
    assert by_name["rp-1"].supported == both  # cluster "new": Ice Lake and Sapphire Rapids honour both
    assert by_name["rp-2"].supported == mitigations_to_bits({Mitigation.RETPOLINE})
    assert by_name["bhb-1"].supported == mitigations_to_bits({Mitigation.BHB_SHORT})  # Cascade Lake: no retpoline
    assert by_name["old-2"].supported == mitigations_to_bits({Mitigation.BHB_SHORT})
    assert by_name["old-1"].supported == 0  # no interface, no promise
    # a guest can only report what it was offered: what it reported is part of the promise even if the cluster's
    # hosts changed since
    f = load(catalog, write_json(tmp_path / "inv2.json", HOSTS, [vm("x", "clx-1", "icelake-server-v2", "retpoline")]))
    assert f.vm_classes[0].supported == both


def test_operator_override_is_exposed_although_check_accepts(catalog: Catalog, tmp_path: Path) -> None:
    hosts = HOSTS + [host("spr-off", "sapphirerapids", cluster="new", force_off="RRSBA_DIS_S")]
    p = _plan(catalog, tmp_path, hosts=hosts)
    f = p.fleet
    m = p.moves[int(p.move_of[f.vm_class[0], f.host_class[f.host_names.index("spr-off")]])]
    assert m.verdict is Verdict.EXPOSED and m.accepted
    assert m.reasons[0].startswith("operator override: ")


def test_host_settings_replace_the_vms_field_by_field() -> None:
    carried = PartialSettings(force_on=0x40, unreported="trust")
    assert PartialSettings().over(carried) == OperatorSettings(0x40, 0, "trust")
    assert PartialSettings(force_off=0x40).over(carried) == OperatorSettings(0, 0x40, "trust")
    assert PartialSettings(unreported="assume-worst").over(carried) == OperatorSettings(0x40, 0, "assume-worst")
    assert PartialSettings().over(PartialSettings()) == OperatorSettings()


def test_own_host_is_not_a_destination_and_counts_add_up(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    names = p.fleet.vm_names.to_pylist()
    counts = {n: tuple(int(x) for x in p.vm_counts[i]) for i, n in enumerate(names)}
    assert counts["rp-1"] == (1, 1, 3)  # safe: icx-2; forced: spr-1; exposed: clx-1, clx-2, milan-1
    assert counts["bhb-1"] == (3, 1, 1)
    assert all(sum(c) == p.fleet.num_hosts - 1 for c in counts.values())
    assert [Verdict(int(v)).word for v in p.vm_here] == ["safe", "safe", "safe", "safe"]
    # the only AMD host: an AMD guest cannot keep the AMD bits it was shown on an Intel host
    assert p.fleet.vm_names.take(p.stranded).to_pylist() == ["amd-1"]


def test_vm_with_no_safe_destination(catalog: Catalog, tmp_path: Path) -> None:
    hosts = [host("spr-1", "sapphirerapids"), host("clx-1", "cascadelake-sp"), host("clx-2", "cascadelake-sp")]
    vms = [vm("stuck", "spr-1", "icelake-server-v2", "retpoline"), vm("fine", "clx-1", "cascadelake-sp", "none")]
    p = _plan(catalog, tmp_path, hosts, vms)
    assert p.fleet.vm_names.take(p.stranded).to_pylist() == ["stuck"]
    assert p.counts()["vms_without_safe_destination"] == 1
    doc = plan_document(p)
    assert doc["vms_without_safe_destination"] == ["stuck"]


def test_pools(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    f = p.fleet
    cpus = [{f.host_classes[h].cpu for h in pool.host_classes} for pool in p.pools]
    assert cpus == [{"icelake-sp", "sapphirerapids", "cascadelake-sp"}, {"icelake-sp", "sapphirerapids"},
                    {"epyc-milan"}]  # the pool rule keeps Intel and AMD guests apart
    assert [(pool.hosts, pool.vms) for pool in p.pools] == [(5, 2), (3, 1), (1, 1)]
    names = f.vm_names.to_pylist()
    pool_of = {names[i]: p.pools[int(p.vm_class_pool[f.vm_class[i]])].id for i in range(len(names))}
    assert pool_of == {"rp-1": "P2", "amd-1": "P3", "bhb-1": "P1", "old-1": "P1"}
    # pools say what they may show and which shown bits keep their VMs off the other hosts
    p2 = p.pools[1]
    assert "CPUID.(7,2).EDX.PSFD" in p2.constraining_bits  # rp-1 was shown Ice Lake's PSFD: not on Cascade Lake
    assert "arch_capabilities.IBRS_ALL" in p2.shows and p2.mitigation_enum == 3
    assert "arch_capabilities.ITS_NO" not in p.pools[0].shows  # Cascade Lake and Ice Lake are ITS-affected
    # in its pool a VM is never exposed
    for pool in p.pools:
        assert (p.verdict[np.ix_(np.array(pool.vm_classes), np.array(pool.host_classes))] != Verdict.EXPOSED).all()


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, host: CpuFacts, reported: frozenset[Mitigation] | None, personality: CpuFacts,
                 settings: OperatorSettings) -> Decision:
        self.calls += 1
        return decide(host, reported, personality, settings)


def test_cost_grows_with_classes_not_with_vms_or_hosts(catalog: Catalog, tmp_path: Path) -> None:
    small, big = Counting(), Counting()
    p1 = _plan(catalog, tmp_path, judge=Judge(small))
    hosts = [dict(h, name=f"{h['name']}-{k}") for k in range(10) for h in HOSTS]
    vms = [dict(v, name=f"{v['name']}-{k}", host=f"{v['host']}-{k % 10}") for k in range(50) for v in VMS]
    p2 = _plan(catalog, tmp_path, hosts, vms, judge=Judge(big))
    assert (p2.fleet.num_vms, p2.fleet.num_hosts) == (200, 60)
    assert (len(p2.fleet.vm_classes), len(p2.fleet.host_classes)) == (len(p1.fleet.vm_classes),
                                                                       len(p1.fleet.host_classes)) == (4, 4)
    assert big.calls == small.calls == p2.decisions <= 4 * 4
    # and the expansion is still right per VM: 60 hosts, 10 of them its own class-mates
    i = p2.fleet.vm_names.to_pylist().index("rp-1-0")
    assert tuple(int(x) for x in p2.vm_counts[i]) == (19, 10, 30)  # 19 other ICX; 10 SPR; 20 CLX + 10 Milan


def test_every_pair_matches_state_check(catalog: Catalog) -> None:
    """On the shipped sample: each class pair's verdict is what `interface.state.check` answers for a VM of that
    class restored on a host of that class, with the controls `decide` forces there."""
    p = plan(load(catalog, sample_path()))
    f = p.fleet
    checked = 0
    for i, vc in enumerate(f.vm_classes):
        config = InterfaceConfig(vc.form or Form.INTEL, vc.supported)
        for j, hc in enumerate(f.host_classes):
            source = VmInterface(config, hc.facts, vc.facts, vc.settings.over(PartialSettings()))
            if vc.reported is not None:
                assert source.wrmsr(0, config.ctrl_msr, mitigations_to_bits(vc.reported))
            verdict = check(snapshot(source), hc.facts, hc.settings if hc.settings.given else None)
            m = p.moves[int(p.move_of[i, j])]
            assert m.accepted == verdict.accepted, (vc.label, hc.label)
            d = verdict.decisions[0]
            assert m.forced == tuple(str(x.control.name) for x in d.forced if x.on)
            overridden = any(e.override for e in d.exposures)
            needed = [x for x in d.forced if x.on and x.why is not Why.OPERATOR]
            expected = Verdict.EXPOSED if not verdict.accepted or overridden else \
                Verdict.FORCED if needed else Verdict.SAFE
            assert m.verdict is expected
            checked += 1
    assert checked == p.pairs > 500


def test_moves_table_lists_every_other_host(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    t = moves_table(p)
    assert t.num_rows == 4 * 5
    rows = t.to_pylist()
    assert all(r["host"] != r["destination"] for r in rows)
    got = {(r["vm"], r["destination"]): (r["verdict"], r["forced_controls"]) for r in rows}
    assert got[("rp-1", "spr-1")] == ("forced", "RRSBA_DIS_S")
    assert got[("rp-1", "clx-2")][0] == "exposed"
    per_vm = {}
    for r in rows:
        per_vm.setdefault(r["vm"], []).append(r["verdict"])
    vt = vms_table(p).to_pylist()
    for r in vt:
        assert per_vm[r["vm"]].count("safe") == r["safe_destinations"]
        assert per_vm[r["vm"]].count("exposed") == r["exposed_destinations"]
    with pytest.raises(Exception, match="VMs x hosts"):
        moves_table(p, limit=10)


def test_tables_written_as_parquet_and_csv(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    pq_paths = write_tables(p, tmp_path / "pq", "parquet", per_vm=True)
    csv_paths = write_tables(p, tmp_path / "csv", "csv")
    assert {x.name for x in pq_paths} == {"vms.parquet", "pairs.parquet", "hosts.parquet", "host_classes.parquet",
                                          "vm_classes.parquet", "pools.parquet", "moves.parquet"}
    assert {x.name for x in csv_paths} == {"vms.csv", "pairs.csv", "hosts.csv", "host_classes.csv",
                                           "vm_classes.csv", "pools.csv"}
    vms = pq.read_table(tmp_path / "pq" / "vms.parquet").to_pylist()
    assert vms[0]["vm"] == "rp-1" and vms[0]["host"] == "icx-1" and vms[0]["verdict_here"] == "safe"
    pairs = pq.read_table(tmp_path / "pq" / "pairs.parquet")
    assert pairs.num_rows == p.pairs
    text = (tmp_path / "csv" / "pairs.csv").read_text()
    assert "RRSBA_DIS_S" in text and "retpoline is ineffective here" in text


def test_json_document_per_vm(catalog: Catalog, tmp_path: Path) -> None:
    p = _plan(catalog, tmp_path)
    doc = plan_document(p, per_vm=True)
    rp = next(v for v in doc["vms"] if v["name"] == "rp-1")
    assert rp["destination_hosts"] == {"safe": ["icx-2"], "forced": ["spr-1"],
                                       "exposed": ["clx-1", "clx-2", "milan-1"]}
    assert rp["destinations"] == {"safe": 1, "forced": 1, "exposed": 3}
    cls = doc["vm_classes"][rp["class"]]
    spr = next(d for d in cls["destinations"] if doc["host_classes"][d["host_class"]]["cpu"] == "sapphirerapids")
    assert doc["moves"][spr["move"]]["forced"] == ["RRSBA_DIS_S"]
    assert "destination_hosts" not in plan_document(p)["vms"][0]
