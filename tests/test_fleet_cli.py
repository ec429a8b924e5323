"""`pvmit fleet ...` and `pvmit bench fleet` through the real entry point: exit codes, --json, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import REPO
from fleet_helpers import HOSTS, VMS, host, vm, write_json

from pvmit.fleet.generate import sample_path

SAMPLE = str(sample_path())


def test_plan_the_sample(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("fleet", "plan", SAMPLE, "--vm", "billing-db-01")
    assert r.code == 0, r.stderr
    assert r.stdout.startswith("Fleet: 41 hosts in ")
    assert "Migration pools" in r.stdout and "VM billing-db-01 on " in r.stdout
    assert "RRSBA_DIS_S" in r.stdout  # the retpoline guest's moves to Sapphire Rapids force it


def test_plan_json_is_one_document(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("fleet", "plan", SAMPLE, "--json", "--output", str(tmp_path / "t"), "--format", "csv")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "pvmit.fleet-plan/1" and doc["errors"] == [] and doc["errors_total"] == 0
    c = doc["counts"]
    assert c["vms"] == len(doc["vms"]) == 305 and c["hosts"] == 41
    assert c["decisions"] <= c["class_pairs"] == c["vm_classes"] * c["host_classes"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["host_classes.csv", "hosts.csv", "pairs.csv",
                                                                 "pools.csv", "vm_classes.csv", "vms.csv"]


def test_wrong_rows_exit_2_after_the_plan_and_strict_stops(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inv = write_json(tmp_path / "inv.json", HOSTS + [host("bad", "no-such-cpu")],
                     VMS + [vm("x", "icx-1", "icelake-server-v2", "retpoline", form="hypercall")])
    r = cli("fleet", "plan", str(inv), "--json")
    assert r.code == 2
    doc = json.loads(r.stdout)
    assert doc["counts"]["vms"] == len(VMS) and doc["errors_total"] == 2
    assert [(e["table"], e["row"], e["field"]) for e in doc["errors"]] == [("hosts", 7, "cpu"), ("vms", 5, "form")]
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"pvmit: error: {inv}: hosts row 7: field 'cpu': no CPU model named 'no-such-cpu' in the " \
                       "catalog; `pvmit catalog list` shows every model"
    assert lines[1].startswith(f"pvmit: error: {inv}: vms row 5: field 'form': 'hypercall' is not one of")
    r = cli("fleet", "plan", str(inv), "--strict", "--json")
    assert r.code == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [lines[0]]


def test_plan_refuses_bad_invocations(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for args in (["fleet", "plan"], ["fleet", "plan", str(tmp_path / "nope.json")],
                 ["fleet", "plan", SAMPLE, "--vm", "no-such-vm"], ["fleet", "plan", SAMPLE, "--format", "xml"]):
        r = cli(*args)
        assert r.code == 2, (args, r)
        assert r.stderr.strip() and "Traceback" not in r.stderr


def test_per_vm_tables(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inv = write_json(tmp_path / "inv.json", HOSTS, VMS)
    r = cli("fleet", "plan", str(inv), "-o", str(tmp_path / "out"), "--per-vm")
    assert r.code == 0, r.stderr
    moves = pq.read_table(tmp_path / "out" / "moves.parquet")
    assert moves.num_rows == len(VMS) * (len(HOSTS) - 1)


def test_generate_then_plan_and_report(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("fleet", "generate", "--vms", "2000", "--hosts", "60", "-o", str(tmp_path / "fleet"), "--format", "csv")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "fleet").iterdir()) == ["hosts.csv", "vms.csv"]
    r = cli("fleet", "plan", str(tmp_path / "fleet"), "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["counts"]["vms"] == 2000 and doc["counts"]["hosts"] == 60 and doc["errors_total"] == 0
    assert doc["counts"]["vm_classes"] < 2000 / 4  # VMs collapse into classes
    r = cli("fleet", "report", str(tmp_path / "fleet"), "-o", str(tmp_path / "r.html"))
    assert r.code == 0, r.stderr
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


def test_generate_is_deterministic(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("a.json", "b.json"):
        assert cli("fleet", "generate", "--vms", "50", "--hosts", "8", "-o", str(tmp_path / name)).code == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_sample_command(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("fleet", "sample", "-o", str(tmp_path / "inventory.json"))
    assert r.code == 0
    assert (tmp_path / "inventory.json").read_text() == Path(SAMPLE).read_text()
    r = cli("fleet", "sample")
    assert json.loads(r.stdout)["schema"] == "pvmit.fleet-inventory/1"
    assert cli("fleet", "sample", "--path").stdout.strip() == SAMPLE


def test_sample_is_realistic() -> None:
    doc = json.loads(Path(SAMPLE).read_text())
    vms = doc["vms"]
    assert 200 <= len(vms) <= 500 and 30 <= len(doc["hosts"]) <= 60
    assert {v["form"] for v in vms} == {"intel", "kvm", "neutral", "none"}
    assert sum(v["mitigations"] == "unenlightened" for v in vms) > 20
    assert any(isinstance(h["cpu"], dict) for h in doc["hosts"])  # a host read with `pvmit host --json`
    assert any("force_on" in h for h in doc["hosts"]) and any("unreported" in v for v in vms)
    assert len({h["cpu"] for h in doc["hosts"] if isinstance(h["cpu"], str)}) >= 10


def test_readme_example_is_the_sample() -> None:
    text = (REPO / "README.md").read_text()
    assert "pvmit fleet sample -o inventory.json" in text
    assert "pvmit fleet plan inventory.json" in text


def test_bench_fleet_prints_its_figures(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("bench", "fleet", "--vms", "3000", "--hosts", "40", "--json")
    doc = json.loads(r.stdout)
    assert r.code == (0 if doc["within_targets"] else 1)
    assert doc["exit_status"] == 0 and doc["vms"] == 3000 and doc["cores"] >= 1
    assert doc["seconds"] > 0 and doc["peak_rss_bytes"] > 0 and doc["tables_written"] == [
        "host_classes.parquet", "hosts.parquet", "pairs.parquet", "pools.parquet", "vm_classes.parquet",
        "vms.parquet"]
    assert any("policy decisions" in s for s in doc["stages"])
