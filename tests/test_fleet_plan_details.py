"""The fleet plan's details that the scenario tests in test_fleet_plan.py do not pin: empty fleets, progress,
counts and JSON as written, the Judge's memory, how a decision becomes a Move, and pools from a verdict matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fleet_helpers import HOSTS, VMS, host, plan_of, vm, write_json

from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.fleet import plan as plan_mod
from pvmit.fleet.classes import Resolver, collapse
from pvmit.fleet.inventory import read_inventory
from pvmit.fleet.plan import Judge, Move, Pool, Verdict, _pools, move_from
from pvmit.fleet.tables import write_tables
from pvmit.interface.bhi import BhiPolicy
from pvmit.interface.policy import Decision, Exposure, Forced, Why
from pvmit.x86.bits import SpecCtrl


def test_a_fleet_without_vms(catalog: Catalog, tmp_path: Path) -> None:
    p = plan_of(catalog, write_json(tmp_path / "inv.json", HOSTS, []))
    assert p.verdict.shape == (0, len(p.fleet.host_classes)) and p.move_of.dtype == np.int32
    assert p.class_counts.shape == (0, 3) and p.class_counts.dtype == np.int64
    assert p.vm_here.shape == (0,) and p.vm_here.dtype == np.int8
    assert p.vm_counts.shape == (0, 3) and p.vm_counts.dtype == np.int32
    assert p.host_class_size.dtype == np.int64 and p.host_class_size.sum() == len(HOSTS)
    assert p.pools == [] and p.stranded.size == 0
    c = p.counts()
    assert c["vms"] == 0 and c["vms_by_verdict_on_own_host"] == {"safe": 0, "forced": 0, "exposed": 0}
    assert c["unenlightened_vms"] == 0 and c["vms_without_safe_destination"] == 0


def test_counts_as_written(catalog: Catalog, tmp_path: Path) -> None:
    p = plan_of(catalog, write_json(tmp_path / "inv.json", HOSTS, VMS))
    c = p.counts()
    nhc, nvc = len(p.fleet.host_classes), len(p.fleet.vm_classes)
    here = {v.word: int((p.vm_here == v).sum()) for v in Verdict}
    assert c == {
        "hosts": 6, "vms": 4, "host_rows_read": 6, "vm_rows_read": 4, "row_errors": 0,
        "host_classes": nhc, "vm_classes": nvc, "class_pairs": nhc * nvc, "decisions": p.decisions,
        "pools": len(p.pools), "vms_by_verdict_on_own_host": here,
        "vms_without_safe_destination": int(p.stranded.size),
        "vms_in_no_pool": int(p.vm_class_size[p.vm_class_pool < 0].sum()), "unenlightened_vms": 1}
    assert sum(here.values()) == 4 and 0 < p.decisions <= nhc * nvc
    assert p.vm_class_size.dtype == np.int64 and p.vm_class_size.sum() == 4
    assert p.vm_class_pool.dtype == np.int64


def test_progress_is_said_per_tenth_of_the_vm_classes(catalog: Catalog, tmp_path: Path) -> None:
    models = [m.id for m in catalog][:25]
    vms = [vm(f"v{i}-{r}", "icx-1", model, r) for i, model in enumerate(models) for r in ("retpoline", "none")]
    path = write_json(tmp_path / "inv.json", HOSTS, vms)
    from fleet_helpers import load

    fleet = load(catalog, path)
    nvc, nhc = len(fleet.vm_classes), len(fleet.host_classes)
    assert nvc == 50
    said: list[str] = []
    plan_mod.plan(fleet, progress=said.append)
    assert said == [f"deciding {nvc * nhc:,} class pairs ({nvc} VM classes x {nhc} host classes)",
                    *[f"  {k}/50 VM classes decided" for k in range(5, 51, 5)],
                    "expanding to 50 VMs", f"computing what each of {said[-1].split()[4]} pools may show"]
    small: list[str] = []
    plan_mod.plan(load(catalog, write_json(tmp_path / "small.json", HOSTS, VMS)), progress=small.append)
    assert len(small) == 3 and not any("decided" in s for s in small)
    plan_mod.plan(fleet)  # no progress callback: nothing is said, nothing fails


def test_progress_steps_are_whole_tenths(catalog: Catalog, tmp_path: Path) -> None:
    """55 VM classes: a line every 5 (55 // 10), not every 5.5."""
    from fleet_helpers import load

    models = [m.id for m in catalog][:11]
    variants = [("retpoline", "intel"), ("none", "intel"), ("retpoline", "kvm"), ("none", "kvm"), ("none", "neutral")]
    vms = [vm(f"v{i}-{k}", "icx-1", model, mits, form=form)
           for i, model in enumerate(models) for k, (mits, form) in enumerate(variants)]
    fleet = load(catalog, write_json(tmp_path / "inv.json", HOSTS, vms))
    assert len(fleet.vm_classes) == 55 and fleet.errors.total == 0
    said: list[str] = []
    plan_mod.plan(fleet, progress=said.append)
    assert [s for s in said if "decided" in s] == [f"  {k}/55 VM classes decided" for k in range(5, 56, 5)]


def test_counts_are_integers_in_the_arrays_and_the_tables(catalog: Catalog, tmp_path: Path) -> None:
    """Destination and host counts stay integers with VMs present: a float here would turn the Parquet columns
    users query (safe_destinations, safe_hosts, ...) into doubles."""
    p = plan_of(catalog, write_json(tmp_path / "inv.json", HOSTS, VMS))
    assert p.vm_counts.dtype == np.int32 and p.class_counts.dtype == np.int64 and p.vm_here.dtype == np.int8
    write_tables(p, tmp_path / "pq", "parquet")

    def types(table: str) -> dict[str, pa.DataType]:
        schema = pq.read_schema(tmp_path / "pq" / f"{table}.parquet")
        return {name: schema.field(name).type for name in schema.names}

    vms, classes, pairs = types("vms"), types("vm_classes"), types("pairs")
    assert [vms[f"{v.word}_destinations"] for v in Verdict] == [pa.int32()] * 3
    assert [classes[f"{v.word}_hosts"] for v in Verdict] == [pa.int64()] * 3 and classes["vms"] == pa.int64()
    assert pairs["hosts"] == pa.int64() and pairs["vms"] == pa.int64()
    assert types("host_classes")["hosts"] == pa.int64()


def test_the_bhi_policy_reaches_every_judgement(catalog: Catalog, tmp_path: Path) -> None:
    """Under each BHI policy the planner judges a move to a long-history host as the VMM would: the decision, the
    MITIGATION_ENUM promises and the LONG_BHB_NEEDED bit shown at boot, each under that policy (test_bhi.py runs a
    plan through the CLI, which mutation testing cannot see)."""
    path = write_json(tmp_path / "inv.json",
                      [host("icx-1", "icelake-sp", cluster="old"), host("spr-1", "sapphirerapids", cluster="new")],
                      [vm("quiet", "icx-1", "icelake-sp", "unenlightened", form="neutral"),
                       vm("promised", "icx-1", "icelake-sp", "none", supported="bhb-short"),
                       vm("shown", "icx-1", "icelake-sp", "none", supported="retpoline")])

    def to_spr(policy: BhiPolicy) -> dict[str, Move]:
        fleet = collapse(read_inventory([path]), Resolver(catalog), policy)
        p = plan_mod.plan(fleet, Judge(bhi_policy=policy))
        (spr,) = [j for j, c in enumerate(fleet.host_classes) if c.cpu == "sapphirerapids"]
        return {name: p.moves[p.move_of[c, spr]] for name, c in zip(fleet.vm_names.to_pylist(), fleet.vm_class,
                                                                       strict=True)}

    promise = ("the VM was promised short BHB-clearing sequence support (MITIGATION_ENUM bit 0) but this host "
               "cannot honour it: short BHB-clearing sequence is ineffective")
    shown = "the VM was shown LONG_BHB_NEEDED = 0 at boot"
    d = to_spr(BhiPolicy.FORCE_BHI_DIS_S)
    assert (d["quiet"].verdict, d["quiet"].forced) == (Verdict.FORCED, ("BHI_DIS_S",))
    assert d["promised"].verdict is Verdict.SAFE and d["shown"].verdict is Verdict.SAFE
    for policy in (BhiPolicy.LONG_UNDER_HYPERVISOR, BhiPolicy.LONG_NEEDED_BIT):
        m = to_spr(policy)
        quiet, promised = m["quiet"], m["promised"]
        assert (quiet.verdict, quiet.forced, quiet.accepted) == (Verdict.EXPOSED, (), False), policy
        left, broken = quiet.reasons[:2]
        assert left.startswith("left to the guest by the BHI policy: short BHB-clearing sequence is ineffective here")
        assert f"under the BHI policy {policy.value}" in left
        assert broken.startswith(promise) and f"the BHI policy {policy.value} never forces" in broken
        assert (promised.verdict, promised.forced) == (Verdict.EXPOSED, ())
        assert promised.reasons[0].startswith(promise)
        long_bit = policy is BhiPolicy.LONG_NEEDED_BIT
        assert len(quiet.reasons) == len(promised.reasons) + 1 == 2 + long_bit
        assert m["shown"].verdict is (Verdict.EXPOSED if long_bit else Verdict.SAFE)
        if long_bit:
            assert quiet.reasons[2].startswith(shown) and promised.reasons[1].startswith(shown)
            assert len(m["shown"].reasons) == 1 and m["shown"].reasons[0].startswith(shown)
            assert "a guest that honours the bit would run the short loop here" in m["shown"].reasons[0]


def test_judge_remembers_each_distinct_question(catalog: Catalog, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """One Move per distinct input, kept; and each of the Judge's memories on its own: moves that differ in what
    one part sees still share the others."""
    import dataclasses
    fleet = plan_of(catalog, write_json(tmp_path / "inv.json", HOSTS, VMS)).fleet
    calls: dict[str, int] = {"promises": 0, "shown": 0}
    real_promises, real_shown = plan_mod.broken_promises, plan_mod.shown_bit_violations

    def promises(*a: Any) -> Any:
        calls["promises"] += 1
        return real_promises(*a)

    def shown(*a: Any) -> Any:
        calls["shown"] += 1
        return real_shown(*a)

    monkeypatch.setattr(plan_mod, "broken_promises", promises)
    monkeypatch.setattr(plan_mod, "shown_bit_violations", shown)
    judge = Judge()
    vc, hc = fleet.vm_classes[0], fleet.host_classes[0]
    first = judge(vc, hc)
    assert judge(vc, hc) == first and judge(vc, hc) is first
    assert judge.decisions == 1 and calls == {"promises": 1, "shown": 1}
    other_enum = dataclasses.replace(vc, supported=vc.supported ^ 1)  # promises differ; decision and bits do not
    assert judge(other_enum, hc) is judge(other_enum, hc)
    assert judge.decisions == 1 and calls == {"promises": 2, "shown": 1}
    other_report = dataclasses.replace(vc, reported=frozenset())  # the decision differs; promises and bits do not
    judge(other_report, hc)
    assert judge.decisions == 2 and calls == {"promises": 2, "shown": 1}


def test_bincount_counts_past_its_slices() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 3, size=(1 << 21) + 12345, dtype=np.int8)
    assert plan_mod.bincount(a, 3).tolist() == np.bincount(a, minlength=3).tolist()
    assert plan_mod.bincount(a, 2).tolist() == np.bincount(a, minlength=3)[:2].tolist()
    assert plan_mod.bincount(a[:0], 3).tolist() == [0, 0, 0]


def test_the_plan_keeps_its_matrices_small(catalog: Catalog, tmp_path: Path) -> None:
    """One byte per class pair and per VM verdict (100k x 10k classes must fit), four per count."""
    p = plan_of(catalog, write_json(tmp_path / "inv.json", HOSTS, VMS))
    assert p.verdict.dtype == np.int8 and p.vm_here.dtype == np.int8
    assert p.vm_counts.dtype == np.int32 and p.movable.dtype == np.int32
    assert p.vm_counts.shape[0] > 1 and p.vm_counts.flags.f_contiguous  # a verdict's column is one block to write


def decision(forced: tuple[Forced, ...] = (), exposures: tuple[Exposure, ...] = (), notes: tuple[str, ...] = (),
             warnings: tuple[str, ...] = ("w",), assumed: tuple[str, ...] = ("a.B",)) -> Decision:
    return Decision(frozenset({Mitigation.RETPOLINE}), True, forced, exposures, notes, warnings, assumed)


R_DIS = SpecCtrl.RRSBA_DIS_S


def test_a_decision_becomes_a_move() -> None:
    forced = move_from(decision((Forced(R_DIS, True, Why.GUEST, "needed", True),)), ())
    assert forced == Move(Verdict.FORCED, True, ("RRSBA_DIS_S",), ("RRSBA_DIS_S (guest report): needed",), ("w",),
                          ("a.B",))
    safe = move_from(decision(), ())
    assert safe == Move(Verdict.SAFE, True, (), ("relies on nothing this host must make up for",), ("w",), ("a.B",))
    noted = move_from(decision(notes=("retpoline: effective here",)), ())
    assert noted.reasons == ("retpoline: effective here",)
    exposed = move_from(decision(exposures=(Exposure(Mitigation.RETPOLINE, "gone", override=True),
                                            Exposure(Mitigation.BHB_SHORT, "also gone"))), ("promise",))
    assert exposed.verdict is Verdict.EXPOSED and not exposed.accepted
    assert exposed.reasons == ("operator override: gone", "also gone", "promise")
    bits = move_from(decision(), (), (("ARCH_CAP.ITS_NO", "shown ITS_NO, false here"),))
    assert (bits.verdict, bits.bits, bits.reasons) == (Verdict.EXPOSED, ("ARCH_CAP.ITS_NO",),
                                                        ("shown ITS_NO, false here",))
    assert bits.to_json() == {"verdict": "exposed", "accepted_by_check": False, "forced": [],
                              "reasons": ["shown ITS_NO, false here"], "warnings": ["w"], "assumed_facts": ["a.B"],
                              "constraining_bits": ["ARCH_CAP.ITS_NO"]}


def test_pools_from_a_verdict_matrix() -> None:
    S, F, X = Verdict.SAFE, Verdict.FORCED, Verdict.EXPOSED
    verdict = np.array([[S, F, X, S],    # VM class 0: host classes 0, 1, 3 (forced on 1)
                        [S, S, X, S],    # VM class 1: the same hosts, nothing forced
                        [X, X, S, X],    # VM class 2: host class 2 only
                        [X, X, X, X],    # VM class 3: nowhere
                        [F, X, X, F]],   # VM class 4: host classes 0 and 3, forced on both
                       dtype=np.int8)
    host_size = np.array([5, 1, 2, 3], dtype=np.int64)
    vm_size = np.array([10, 20, 40, 7, 1], dtype=np.int64)
    pools, vm_pool = _pools(verdict, host_size, vm_size)
    assert [(p.id, p.host_classes, p.vm_classes, p.hosts, p.vms, p.forcing_hosts) for p in pools] == [
        ("P1", (0, 1, 3), (0, 1), 9, 30, 1),
        ("P2", (0, 3), (4,), 8, 1, 8),
        ("P3", (2,), (2,), 2, 40, 0)]
    assert vm_pool.tolist() == [0, 0, 2, -1, 1] and vm_pool.dtype == np.int64
    assert pools[0].to_json() == {"id": "P1", "host_classes": [0, 1, 3], "vm_classes": [0, 1], "hosts": 9,
                                  "vms": 30, "hosts_forcing_controls": 1, "shows": [], "mitigation_enum": 0,
                                  "constraining_bits": []}


def test_pools_tie_break() -> None:
    """Equal host counts: the pool with more VMs first; equal both: by host classes."""
    S, X = Verdict.SAFE, Verdict.EXPOSED
    verdict = np.array([[S, X, X], [X, S, X], [X, X, S]], dtype=np.int8)
    pools, _ = _pools(verdict, np.array([2, 2, 2], dtype=np.int64), np.array([1, 5, 1], dtype=np.int64))
    assert [p.host_classes for p in pools] == [(1,), (0,), (2,)]
    # by host classes, not by VM classes: VM class 0 goes to host class 1, VM class 1 to host class 0
    pools, vm_pool = _pools(np.array([[X, S], [S, X]], dtype=np.int8), np.array([2, 2], dtype=np.int64),
                            np.array([1, 1], dtype=np.int64))
    assert [(p.id, p.host_classes, p.vm_classes) for p in pools] == [("P1", (0,), (1,)), ("P2", (1,), (0,))]
    assert vm_pool.tolist() == [1, 0]


def test_a_pool_in_a_real_plan_says_what_it_shows(catalog: Catalog, tmp_path: Path) -> None:
    p = plan_of(catalog, write_json(tmp_path / "inv.json", [host("a", "icelake-sp"), host("b", "icelake-sp"),
                                                               host("c", "cascadelake-sp")],
                                    [vm("v", "a", "icelake-sp", "none")]))
    (pool,) = [x for x in p.pools if 0 in x.vm_classes]
    doc = pool.to_json()
    assert doc["hosts"] == 2 and doc["vms"] == 1 and isinstance(doc["shows"], list) and doc["shows"]
    assert doc["mitigation_enum"] == pool.mitigation_enum and doc["constraining_bits"] == list(pool.constraining_bits)
    assert isinstance(Pool, type)
