"""The four BHI policies (issue 16): what each decides, shows and refuses, the guest model behind the comparison,
the guest agent's reading of the pool description, the commands that take --bhi-policy, the test guest on KVM, and
a smoke run of `pvmit bench bhi`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import REPO
from test_agent import BOTH, EIBRS_LOOP, HV_LEAF1, FakeGuest, VmMsr, cpuid_from

from pvmit.agent.main import main as agent_main
from pvmit.catalog.loader import Catalog
from pvmit.derive import Mitigation
from pvmit.interface import Form, InterfaceConfig, OperatorSettings, VmInterface, check, decide, snapshot
from pvmit.interface.bhi import BhiPolicy, long_bhb_needed, long_bit_reasons, parse_policy, shown_long_bit
from pvmit.interface.bhi_compare import compare, guest_kinds, scenario_pools
from pvmit.interface.policy import supported_requests
from pvmit.interface.pooldesc import Implementation, cpu_history, describe, describe_facts
from pvmit.kvm.system import Kvm, kvm_available
from pvmit.linux.bhb import Proposal, bhb_choice
from pvmit.linux.kernel import Kernel, KernelVersion
from pvmit.vmm.personality import build_cpuid, from_model
from pvmit.x86.bits import SpecCtrl

SHORT = frozenset({Mitigation.BHB_SHORT})
USABLE, WHY = kvm_available()
needs_kvm = [pytest.mark.kvm, pytest.mark.skipif(not USABLE, reason=f"needs a usable /dev/kvm: {WHY}")]
LEAVING = [p for p in BhiPolicy if not p.forces_bhi_dis_s]


def forced_bhi(d: object) -> bool:
    return any(f.control is SpecCtrl.BHI_DIS_S and f.on for f in d.forced)  # type: ignore[attr-defined]


# --- the policies themselves --------------------------------------------------------------------------------------

def test_only_force_bhi_dis_s_forces_it(catalog: Catalog) -> None:
    spr, icx = catalog.get("sapphirerapids").facts, catalog.get("icelake-sp").facts
    d = decide(spr, SHORT, icx, OperatorSettings())
    assert forced_bhi(d) and d.safe and not d.by_design  # the default is (d), as before the policies
    for p in LEAVING:
        reported = decide(spr, SHORT, icx, OperatorSettings(bhi_policy=p))
        assert not forced_bhi(reported) and not reported.safe  # a reported short loop it cannot cover: refused
        assert f"policy {p.value} never forces BHI_DIS_S" in reported.exposures[0].reason
        unreported = decide(spr, None, icx, OperatorSettings(bhi_policy=p))
        assert not forced_bhi(unreported) and unreported.safe  # left to the guest: reported, not refused
        assert [e.mitigation for e in unreported.by_design] == [Mitigation.BHB_SHORT]
        trusted = decide(spr, None, icx, OperatorSettings(unreported="trust", bhi_policy=p))
        assert not trusted.by_design and not forced_bhi(trusted)
        on = decide(spr, None, icx, OperatorSettings(force_on=int(SpecCtrl.BHI_DIS_S), bhi_policy=p))
        assert forced_bhi(on)  # an operator may still force it
    cascade = catalog.get("cascadelake-sp").facts  # the short loop is enough there: nothing to leave or force
    for p in BhiPolicy:
        d = decide(cascade, None, icx, OperatorSettings(bhi_policy=p))
        assert not d.by_design and not forced_bhi(d)


def test_mitigation_enum_and_the_long_bit_follow_the_policy(catalog: Catalog) -> None:
    pre = [catalog.get(m).facts for m in ("cascadelake-sp", "icelake-sp")]
    mixed = pre + [catalog.get("sapphirerapids").facts]
    assert supported_requests(mixed) & 1  # (d): BHI_DIS_S can be forced on Sapphire Rapids
    for p in LEAVING:
        assert not supported_requests(mixed, p) & 1 and supported_requests(pre, p) & 1
    assert shown_long_bit(BhiPolicy.LONG_NEEDED_BIT, mixed) is True
    assert shown_long_bit(BhiPolicy.LONG_NEEDED_BIT, pre) is False
    assert all(shown_long_bit(p, mixed) is None for p in BhiPolicy if p is not BhiPolicy.LONG_NEEDED_BIT)
    assert long_bhb_needed([catalog.get("clearwaterforest").facts]) is False  # BHI_NO: not affected
    with pytest.raises(ValueError, match="not one of long-under-hypervisor, cmdline-long"):
        parse_policy("bhi-dis-s")


def test_settings_carry_the_policy(catalog: Catalog) -> None:
    s = OperatorSettings(bhi_policy=BhiPolicy.CMDLINE_LONG)
    assert OperatorSettings.from_json(s.to_json()) == s
    assert OperatorSettings.from_json({}).bhi_policy is BhiPolicy.FORCE_BHI_DIS_S  # a /1 snapshot
    with pytest.raises(ValueError, match="not one of"):
        OperatorSettings.from_json({"bhi_policy": "never"})
    from pvmit.interface.policy import PartialSettings

    assert PartialSettings(unreported="trust").over(s).bhi_policy is BhiPolicy.CMDLINE_LONG


def test_migration_refuses_what_the_guest_was_shown(catalog: Catalog) -> None:
    """LONG_BHB_NEEDED = 0 and a pool description that does not list the host each refuse a move, with a reason;
    a /1 snapshot (before either existed) is still read."""
    icx, spr, gnr = (catalog.get(m).facts for m in ("icelake-sp", "sapphirerapids", "graniterapids"))
    assert long_bit_reasons(False, spr) and not long_bit_reasons(False, icx)
    assert not long_bit_reasons(True, spr) and not long_bit_reasons(None, spr)
    config = InterfaceConfig(Form.NEUTRAL, 0, bhb_long=False, pool=describe_facts([icx, spr]))
    state = snapshot(VmInterface(config, icx, icx, OperatorSettings(bhi_policy=BhiPolicy.LONG_NEEDED_BIT)))
    verdict = check(state, spr)
    assert not verdict.accepted and any("shown LONG_BHB_NEEDED = 0" in r for r in verdict.reasons)
    verdict = check(state, gnr)
    assert any("is not among them" in r and "model 0xad" in r for r in verdict.reasons)
    assert check(state, icx).accepted
    old = {**snapshot(VmInterface(InterfaceConfig(Form.NEUTRAL, 3), icx, icx)), "schema": "pvmit.interface-state/1"}
    for key in ("bhb_long", "pool", "neutral_pool_msr"):
        del old["config"][key]
    del old["settings"]["bhi_policy"]
    assert check(old, spr).accepted


def test_pool_description_identities() -> None:
    pool = describe([("intel", 6, (0x55,), (6, 7)), ("intel", 6, (0x55, 0x6A), ()), ("amd", 0x19, (0x11,), (1,))])
    assert pool == (Implementation("amd", 0x19, 0x11, 1, 1), Implementation("intel", 6, 0x55, 0, 15),
                    Implementation("intel", 6, 0x6A, 0, 15))
    assert Implementation("amd", 0x19, 0x11, 1, 1).encode() == 0x201_00A1_0F11  # Genoa: CPUID.1.EAX 0xa10f11
    assert pool[0].covers("amd", 0x19, 0x11, 1) and not pool[0].covers("amd", 0x19, 0x11, None)
    assert pool[1].covers("intel", 6, 0x55, None)
    with pytest.raises(ValueError, match="at most 32"):
        describe([("intel", 6, tuple(range(33)), ())])
    with pytest.raises(ValueError, match="reserved bits"):
        Implementation.decode(1 << 50)
    with pytest.raises(ValueError, match="not a range"):
        Implementation("intel", 6, 0x55, 7, 6)


# --- the guest model and the comparison ---------------------------------------------------------------------------

def test_which_loop_a_linux_guest_runs(catalog: Catalog) -> None:
    icx, spr = catalog.get("icelake-sp").facts, catalog.get("sapphirerapids").facts
    for version in ("6.1.192", "6.12.117", "6.18"):  # every released kernel: the short loop, whatever it is told
        k = Kernel(KernelVersion.parse(version))
        c = bhb_choice(icx, k, spectre_bhi_long=True, long_bit=True)
        assert c.loop == "short" and c.counts == (5, 5) and "does not act on" in c.reason
    assert bhb_choice(spr).own_bhi_dis_s and bhb_choice(spr).loop == "none"  # shown BHI_CTRL: BHI_DIS_S itself
    for proposal, kw in ((Proposal.LONG_UNDER_HYPERVISOR, {}), (Proposal.SPECTRE_BHI_LONG, {"spectre_bhi_long": True}),
                         (Proposal.LONG_NEEDED_BIT, {"long_bit": True})):
        assert bhb_choice(icx, proposals=frozenset({proposal})).loop == (
            "long" if proposal is Proposal.LONG_UNDER_HYPERVISOR else "short")
        assert bhb_choice(icx, proposals=frozenset({proposal}), **kw).counts == (12, 7)  # type: ignore[arg-type]
    old = Kernel(KernelVersion.parse("6.1.76"))  # before the BHI backport: no loop at all
    assert bhb_choice(icx, old).loop == "none"


def test_the_policies_side_by_side(catalog: Catalog) -> None:
    pools = scenario_pools(catalog)
    assert [m.id for m in pools["pre"][0]][:2] == ["cascadelake-sp", "cooperlake"]
    assert "sapphirerapids" in [m.id for m in pools["post"][0]]
    res = {(r.policy, r.scenario): r.summary() for r in compare(catalog)}
    released = ["linux-6.1", "linux-6.12+agent", "linux-6.18"]
    d = res[(BhiPolicy.FORCE_BHI_DIS_S, "mixed")]
    assert d["guests_exposed"] == [] and d["placements_forced"] > 0 and d["guests_long_loop"] == []
    assert d["guests_paying_bhi_dis_s_averse"] == ["bhi-dis-s-averse"]
    for p in LEAVING:
        mixed = res[(p, "mixed")]
        assert mixed["guests_exposed"] == released and mixed["placements_forced"] == 0
        assert mixed["guests_long_loop"] == ["linux-updated", "bhi-dis-s-averse"]
        assert res[(p, "grown")]["placements_refused"] > 0  # promised the short loop at boot: never moved
        assert res[(p, "pre")]["guests_exposed"] == [] and res[(p, "post")]["guests_exposed"] == []
    assert res[(BhiPolicy.LONG_UNDER_HYPERVISOR, "pre")]["placements_long_needless"] > 0  # (a) pays everywhere
    assert all(res[(p, "pre")]["placements_long_needless"] == 0 for p in BhiPolicy
               if p is not BhiPolicy.LONG_UNDER_HYPERVISOR)
    assert res[(BhiPolicy.LONG_NEEDED_BIT, "mixed")]["long_bhb_needed_shown"] is True
    assert res[(BhiPolicy.LONG_NEEDED_BIT, "pre")]["long_bhb_needed_shown"] is False
    assert res[(BhiPolicy.FORCE_BHI_DIS_S, "grown")]["placements_refused"] == 0
    assert len(guest_kinds()) == 5


def test_the_agents_cpu_table_is_derives_answers(catalog: Catalog) -> None:
    """cpu_history.json is derive's answers on the catalog, written out (regenerate: python tools/agent_table.py)."""
    shipped = json.loads((REPO / "src/pvmit/agent/cpu_history.json").read_text())
    assert shipped == json.loads(json.dumps(cpu_history(catalog))), "stale: run python tools/agent_table.py"
    spr = next(r for r in shipped["cpus"] if r["cpu"] == "sapphirerapids")
    assert (spr["bhb_history"], spr["model"]) == ("long", 0x8F)
    assert next(r for r in shipped["cpus"] if r["cpu"] == "icelake-sp")["bhb_history"] == "short"


# --- the guest agent ----------------------------------------------------------------------------------------------

def agent_guest(catalog: Catalog, form: Form, *, pool: list[str], policy: BhiPolicy, line: str,
                model: str = "icelake-sp") -> tuple[FakeGuest, VmInterface]:
    hosts = [catalog.get(m).facts for m in pool]
    config = InterfaceConfig(form, supported_requests(hosts, policy), bhb_long=shown_long_bit(policy, hosts),
                             pool=describe([(m.vendor, m.family, m.models, m.steppings)
                                            for m in (catalog.get(x) for x in pool)]))
    p = from_model(catalog, model)
    vm = VmInterface(config, hosts[0], p.facts, vcpus=2)
    g = FakeGuest(spectre_v2=line, cpus=[0, 1], cpuid_fn=cpuid_from(build_cpuid(p, config, [HV_LEAF1])),
                  msr_dev=VmMsr(vm))
    return g, vm


def run_agent(g: FakeGuest, *argv: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    out, err = io.StringIO(), io.StringIO()
    code = agent_main(list(argv), machine=g, out=out, err=err)
    return code, json.loads(out.getvalue()) if "--json" in argv else {"text": out.getvalue()}, err.getvalue()


@pytest.mark.parametrize("form", list(Form))
def test_agent_reads_the_pool_and_says_what_fixes_the_short_loop(catalog: Catalog, form: Form) -> None:
    g, _ = agent_guest(catalog, form, pool=["icelake-sp", "sapphirerapids"], policy=BhiPolicy.LONG_NEEDED_BIT,
                       line=EIBRS_LOOP)
    code, doc, _ = run_agent(g, "status", "--json")
    assert doc["interface"]["chosen"]["long_bhb_needed"] is True
    entries = doc["pool"]["entries"]
    assert [(e["cpus"], e["bhb_history"]) for e in entries] == [
        (["icelake-sp"], "short"), (["icelake-sp"], "short"), (["sapphirerapids"], "long")]
    assert doc["pool"]["problems"] == []
    [w] = doc["warnings"]
    assert w["mitigation"] == "bhb-short" and w["fix"] == "spectre_bhi=long"
    assert "sapphirerapids (intel 0x6/0x8f steppings 4-8)" in w["message"] and "LONG_BHB_NEEDED" in w["message"]
    code, text, _ = run_agent(g, "status")
    assert "warning" in text["text"] and "branch history long" in text["text"]


def test_agent_warns_only_where_nothing_makes_up_for_it(catalog: Catalog) -> None:
    # force-bhi-dis-s promises the short loop in MITIGATION_ENUM: BHI_DIS_S will be forced, nothing to fix
    g, _ = agent_guest(catalog, Form.NEUTRAL, pool=["icelake-sp", "sapphirerapids"],
                       policy=BhiPolicy.FORCE_BHI_DIS_S, line=EIBRS_LOOP)
    assert run_agent(g, "status", "--json")[1]["warnings"] == []
    # a pool with the short history only: the short loop is enough
    g, _ = agent_guest(catalog, Form.NEUTRAL, pool=["cascadelake-sp", "icelake-sp"],
                       policy=BhiPolicy.CMDLINE_LONG, line=EIBRS_LOOP)
    assert run_agent(g, "status", "--json")[1]["warnings"] == []
    # retpoline on a pool with Cascade Lake (RRSBA, no RRSBA_CTRL): nothing can make it safe there
    g, _ = agent_guest(catalog, Form.KVM, pool=["cascadelake-sp", "icelake-sp"], policy=BhiPolicy.CMDLINE_LONG,
                       line=BOTH, model="cascadelake-sp")
    warnings = run_agent(g, "status", "--json")[1]["warnings"]
    assert [w["fix"] for w in warnings] == ["spectre_v2=ibrs"] and "cascadelake-sp" in warnings[0]["message"]


def test_agent_without_a_pool_description(catalog: Catalog) -> None:
    p = from_model(catalog, "icelake-sp")
    config = InterfaceConfig(Form.INTEL, 3)
    vm = VmInterface(config, catalog.get("sapphirerapids").facts, p.facts)
    g = FakeGuest(spectre_v2=EIBRS_LOOP, cpus=[0], cpuid_fn=cpuid_from(build_cpuid(p, config, [HV_LEAF1])),
                  msr_dev=VmMsr(vm))
    doc = run_agent(g, "status", "--json")[1]
    assert doc["pool"] is None and doc["warnings"] == []
    assert doc["interface"]["chosen"]["pool_info_msr"] is None


def test_agent_bundle_ships_the_table() -> None:
    from pvmit.agent.bundle import agent_files

    assert "pvmit/agent/cpu_history.json" in agent_files()


# --- commands -----------------------------------------------------------------------------------------------------

def test_cli_policy(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("policy", "--host-cpu", "sapphirerapids", "--guest-cpu", "icelake-sp", "--pool", "icelake-sp",
            "--bhi-policy", "long-needed-bit", "--json")
    doc = json.loads(r.stdout)
    assert r.code == 0 and doc["shown"] == {"mitigation_enum": 2, "long_bhb_needed": True}
    assert doc["bhi_policy"]["letter"] == "c" and doc["exposed_by_policy_design"]
    r = cli("policy", "--host-cpu", "sapphirerapids", "--guest-cpu", "icelake-sp", "--uses", "bhb-short",
            "--bhi-policy", "cmdline-long")
    assert r.code == 1 and "never forces BHI_DIS_S" in r.stdout
    r = cli("policy", "--host-cpu", "sapphirerapids", "--guest-cpu", "icelake-sp", "--bhi-policy", "sometimes")
    assert r.code == 2


def test_cli_pool_describes_the_pool(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("pool", "icelake-sp", "sapphirerapids", "--json")
    doc = json.loads(r.stdout)
    assert r.code == 0 and doc["long_bhb_needed"] is True
    assert doc["pool_description"]["pool_info"] == 3 | 1 << 8
    assert [e["model"] for e in doc["pool_description"]["entries"]] == [0x6A, 0x6C, 0x8F]
    assert "POOL_INFO 0x103" in cli("pool", "icelake-sp", "sapphirerapids").stdout


def test_fleet_plan_under_each_policy(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps({
        "hosts": [{"name": "old", "cpu": "icelake-sp", "cluster": "c"}, {"name": "new", "cpu": "sapphirerapids",
                                                                        "cluster": "c"}],
        "vms": [{"name": "vm", "host": "old", "personality": "icelake-sp", "mitigations": "unenlightened",
                 "form": "neutral"}]}))
    docs = {}
    for p in ("force-bhi-dis-s", "long-needed-bit"):
        r = cli("fleet", "plan", str(inv), "--bhi-policy", p, "--json")
        assert r.code == 0, r.stderr
        docs[p] = json.loads(r.stdout)
    assert docs["force-bhi-dis-s"]["vms"][0]["destinations"] == {"safe": 0, "forced": 1, "exposed": 0}
    c = docs["long-needed-bit"]
    assert c["bhi_policy"] == "long-needed-bit" and c["vms"][0]["destinations"]["exposed"] == 1
    assert c["clusters"]["c"]["long_bhb_needed"] is True and c["vm_classes"][0]["long_bhb_needed"] is True
    assert any("left to the guest by the BHI policy" in r for m in c["moves"] for r in m["reasons"])
    assert len(c["clusters"]["c"]["pool_description"]["entries"]) == 2


def test_bench_doc_block() -> None:
    from pvmit.bench.bhi import DOC_END, DOC_START, replace_block

    text = f"intro\n{DOC_START}\nold\n{DOC_END}\nafter\n"
    new = replace_block(text, "| table |\n", "a run")
    assert new.startswith("intro\n" + DOC_START) and "| table |" in new and "old" not in new
    assert new.endswith(DOC_END + "\nafter\n")
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x", "a run")
    doc = (REPO / "docs/bhi.md").read_text()
    assert DOC_START in doc and DOC_END in doc  # `pvmit bench bhi` can write its table there


def test_native_sequences_run() -> None:
    """The assembled sequences run on this CPU (figures only: nothing is judged on time)."""
    from pvmit.bench.bhi import NativeLoops

    loops = NativeLoops()
    assert loops.ns_per_call((5, 5), 10) > 0 and loops.ns_per_call((12, 7), 10) > 0
    with pytest.raises(ValueError):
        loops.ns_per_call((0, 5), 1)  # an outer count of 0 would loop 2^32 times


# --- on KVM -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvm():  # type: ignore[no-untyped-def]
    with Kvm() as k:
        yield k


@needs_kvm[0]
@needs_kvm[1]
def test_the_test_guest_honours_the_bit_and_reads_the_pool(catalog: Catalog, kvm: Kvm) -> None:
    """In every form: shown LONG_BHB_NEEDED the guest runs the long loop and stops reporting the short one; it reads
    every entry of the pool description and sees the read-only and past-the-count #GPs."""
    from pvmit.vmm.hosts import stand_in, this_machine
    from pvmit.vmm.runner import run_guest

    real, _ = this_machine(catalog)
    host = stand_in(catalog, "sapphirerapids", real)
    pool = [host, stand_in(catalog, "icelake-sp", real)]
    for form, policy in ((Form.INTEL, BhiPolicy.LONG_NEEDED_BIT), (Form.KVM, BhiPolicy.LONG_NEEDED_BIT),
                         (Form.NEUTRAL, BhiPolicy.FORCE_BHI_DIS_S)):
        r = run_guest(kvm, from_model(catalog, "icelake-sp"), host, form, SHORT, OperatorSettings(bhi_policy=policy),
                      pool=pool, describe_pool=True)
        assert r.passed, [c for c in r.checks if not c[1]]
        long = policy is BhiPolicy.LONG_NEEDED_BIT
        assert ("guest: bhb loop long (12x7)" in r.transcript) is long
        assert r.decision["relied_on"] == ([] if long else ["bhb-short"])
        assert sum("pool entry" in ln for ln in r.transcript) == 2


@needs_kvm[0]
@needs_kvm[1]
def test_bench_bhi_smoke(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pvmit.bench.bhi import DOC_END, DOC_START

    doc_file = tmp_path / "bhi.md"
    doc_file.write_text(f"# x\n{DOC_START}\n{DOC_END}\n")
    r = cli("bench", "bhi", "--native-calls", "50", "--guest-calls", "2", "--entries", "3", "--repeats", "1",
            "--doc", str(doc_file), "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    runs = {w["policy"]: w["runs"] for w in doc["workload"]}
    assert runs["force-bhi-dis-s"]["intercept, 2 writes"]["spec_ctrl_exits_per_1k"] == 2000
    assert runs["force-bhi-dis-s"]["hw-mask, 2 writes"]["userspace_exits_per_1k"] == 0
    assert runs["long-needed-bit"]["intercept, 2 writes"]["userspace_exits_per_1k"] == 0
    assert {w["policy"]: w["loop"] for w in doc["workload"]}["cmdline-long"] == "long"
    assert "| (d) force-bhi-dis-s |" in doc_file.read_text()


def test_verify_reports_each_policy_and_catches_a_broken_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pvmit verify` under each policy: no violation, what each leaves to the guest listed; and a VMM that promised
    the short loop under a policy that never forces BHI_DIS_S is caught."""
    from pvmit.safety import verify as verify_mod

    doc = verify_mod.verify([], ["icelake-sp", "sapphirerapids"], jobs=1).to_json()
    assert doc["violations"] == 0
    per = doc["bhi_policies"]
    assert per["force-bhi-dis-s"]["exposed_by_design"] == 0 and per["force-bhi-dis-s"]["guests_exposed_by_design"] == []
    for p in LEAVING:
        assert per[p.value]["exposed_by_design"] > 0
        assert per[p.value]["guests_exposed_by_design"] == [
            "linux-6.1 (mixed pool)", "linux-6.12+agent (mixed pool)", "linux-6.18 (mixed pool)"]
    real = verify_mod.supported_requests
    monkeypatch.setattr(verify_mod, "supported_requests", lambda hosts, policy=None: real(hosts))
    tally = verify_mod.verify([], ["icelake-sp", "sapphirerapids"], jobs=1)
    assert tally.violations and all("reported bhb-short" in v.detail and v.settings.endswith(
        tuple(p.value for p in LEAVING)) for v in tally.violations)
