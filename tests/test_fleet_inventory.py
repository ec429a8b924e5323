"""Inventory readers: the same fleet from JSON, CSV and Parquet; wrong rows named by file, row and field while the
valid rows are still planned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fleet_helpers import HOSTS, VMS, as_tables, host, load, vm, write_dir, write_json

from pvmit.catalog.loader import Catalog
from pvmit.errors import InputError
from pvmit.fleet.inventory import ErrorLog, RowError, read_inventory
from pvmit.fleet.plan import plan
from pvmit.fleet.tables import vms_table


def _errors(catalog: Catalog, *paths: Path) -> set[tuple[str, str, int, str]]:
    f = load(catalog, *paths)
    return {(Path(e.file).name, e.table, e.row, e.field) for e in f.errors.first()}


@pytest.mark.parametrize("fmt", ["json-file", "parquet", "csv", "json", "pair"])
def test_every_format_gives_the_same_plan(catalog: Catalog, tmp_path: Path, fmt: str) -> None:
    reference = vms_table(plan(load(catalog, write_json(tmp_path / "ref.json", HOSTS, VMS)))).to_pylist()
    if fmt == "json-file":
        paths = [write_json(tmp_path / "inv.json", HOSTS, VMS)]
    elif fmt == "pair":  # a hosts CSV and a VMs Parquet file, named in that order
        h, v = as_tables(HOSTS, VMS)
        import pyarrow.csv as pacsv
        pacsv.write_csv(h, tmp_path / "h.csv")
        pq.write_table(v, tmp_path / "v.parquet")
        paths = [tmp_path / "h.csv", tmp_path / "v.parquet"]
    else:
        paths = [write_dir(tmp_path / "inv", HOSTS, VMS, fmt)]
    f = load(catalog, *paths)
    assert not f.errors and f.num_vms == len(VMS) and f.num_hosts == len(HOSTS)
    assert vms_table(plan(f)).to_pylist() == reference


def test_json_cells_may_be_lists_and_host_facts_objects(catalog: Catalog, tmp_path: Path) -> None:
    facts = catalog.get("sapphirerapids").facts.to_json()
    host_doc = {"schema": "pvmit.host/1", "facts": facts, "identity": {}}  # what `pvmit host --json` writes
    (tmp_path / "spr-host.json").write_text(json.dumps(host_doc))
    hosts = [host("a", facts), host("b", "spr-host.json"), host("c", json.dumps(host_doc)), host("d", "SapphireRapids")]
    vms = [vm("v", "a", "icelake-server-v2", ["retpoline"], force_on=["RRSBA_DIS_S"])]
    f = load(catalog, write_json(tmp_path / "inv.json", hosts, vms))
    assert not f.errors
    labels = [f.host_classes[int(k)].cpu for k in f.host_class]
    assert labels[0] == labels[1] == labels[2] != labels[3] == "sapphirerapids"
    assert labels[0].startswith("sapphirerapids (host facts ")
    assert f.vm_classes[0].settings.force_on == 0x40


def test_personality_template_file_relative_to_the_inventory(catalog: Catalog, tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text('name = "mine"\nbase = "icelake-sp"\n[show]\n'
                                        '"arch_capabilities.IBRS_ALL" = false\n')
    f = load(catalog, write_json(tmp_path / "inv.json", HOSTS, [vm("v", "icx-1", "mine.toml", "retpoline")]))
    assert not f.errors and f.vm_classes[0].personality == "mine"


BAD_HOSTS = [
    host("ok-1", "icelake-sp"),
    host("", "icelake-sp"),  # row 2: name
    host("h3", "no-such-cpu"),  # row 3: cpu
    host("h4", None),  # row 4: cpu missing
    host("ok-1", "sapphirerapids"),  # row 5: duplicate name
    host("h6", "icelake-sp", force_on="NOT_A_BIT"),  # row 6: force_on
    host("h7", "icelake-sp", force_on="BHI_DIS_S", force_off="BHI_DIS_S"),  # row 7: both on and off
    host("h8", "icelake-sp", unreported="sometimes"),  # row 8: unreported
    host("h9", '{"vendor": "via"}'),  # row 9: facts that are wrong
    host("h10", "missing-file.json"),  # row 10: a facts file that is not there
    host("h11", {"facts": None}),  # row 11: a `pvmit host` document without facts
    host("ok-12", "cascadelake-sp"),
]
BAD_VMS = [
    vm("good-1", "ok-1", "icelake-server-v2", "retpoline"),
    vm("bad-2", "nowhere", "icelake-server-v2", "retpoline"),  # host unknown
    vm("bad-3", "h3", "icelake-server-v2", "retpoline"),  # host row is wrong
    vm("bad-4", "ok-1", "no-such-personality", "retpoline"),  # personality
    vm("bad-5", "ok-1", "icelake-server-v2", "retpoline,spectre"),  # mitigations
    vm("bad-6", "ok-1", "icelake-server-v2", "retpoline", form="hypercall"),  # form
    vm("bad-7", "ok-1", "icelake-server-v2", "retpoline", form="none"),  # reports without an interface
    vm("bad-8", "ok-1", "icelake-server-v2", "retpoline", supported="bhb-short"),  # never offered retpoline
    vm("good-1", "ok-12", "cascadelake-sp", "none"),  # duplicate name
    vm("", "ok-1", "cascadelake-sp", "none"),  # name
    vm("bad-11", "ok-1", "cascadelake-sp", "none", force_on="RRSBA_DIS_S", force_off="RRSBA_DIS_S"),
    vm("bad-12", "ok-1", "cascadelake-sp", None),  # mitigations missing
    vm("good-13", "ok-12", "cascadelake-sp", "unenlightened", form="none"),
]
EXPECTED = {
    ("hosts", 2, "name"), ("hosts", 3, "cpu"), ("hosts", 4, "cpu"), ("hosts", 5, "name"), ("hosts", 6, "force_on"),
    ("hosts", 7, "force_off"), ("hosts", 8, "unreported"), ("hosts", 9, "cpu"), ("hosts", 10, "cpu"),
    ("hosts", 11, "cpu"),
    ("vms", 2, "host"), ("vms", 3, "host"), ("vms", 4, "personality"), ("vms", 5, "mitigations"), ("vms", 6, "form"),
    ("vms", 7, "form"), ("vms", 8, "mitigations"), ("vms", 9, "name"), ("vms", 10, "name"), ("vms", 11, "force_off"),
    ("vms", 12, "mitigations"),
}


@pytest.mark.parametrize("fmt", ["json-file", "csv", "parquet"])
def test_wrong_rows_are_named_and_the_rest_planned(catalog: Catalog, tmp_path: Path, fmt: str) -> None:
    if fmt == "json-file":
        paths = [write_json(tmp_path / "inv.json", BAD_HOSTS, BAD_VMS)]
        files = {"hosts": "inv.json", "vms": "inv.json"}
    else:
        hosts = [dict(h, cpu=json.dumps(h["cpu"])) if isinstance(h["cpu"], dict) else h for h in BAD_HOSTS]
        paths = [write_dir(tmp_path / "inv", hosts, BAD_VMS, fmt)]
        files = {"hosts": f"hosts.{fmt}", "vms": f"vms.{fmt}"}
    f = load(catalog, *paths)
    got = {(Path(e.file).name, e.table, e.row, e.field) for e in f.errors.first()}
    assert got == {(files[t], t, r, fld) for t, r, fld in EXPECTED}
    assert f.host_names == ["ok-1", "ok-12"]
    assert f.vm_names.to_pylist() == ["good-1", "good-13"]
    msgs = {(e.table, e.row): e.message for e in f.errors.first()}
    assert msgs[("hosts", 3)].startswith("no CPU model named 'no-such-cpu'")
    assert msgs[("hosts", 5)] == "duplicate host name 'ok-1' (first at row 1)"
    assert msgs[("vms", 2)] == "no host named 'nowhere' in the inventory"
    assert msgs[("vms", 3)] == "host 'h3' is wrong in its own row (hosts row 3)"
    assert msgs[("vms", 8)] == "reports retpoline, which its MITIGATION_ENUM (supported: bhb-short) never offered"
    assert msgs[("vms", 9)] == "duplicate VM name 'good-1' (first at row 1)"
    assert msgs[("vms", 12)] == "required, but empty"
    assert str(f.errors.first(1)[0]).startswith(f"{paths[0] if fmt == 'json-file' else paths[0] / files['hosts']}: "
                                                "hosts row 2: field 'name': ")
    assert plan(f).fleet.num_vms == 2


def test_json_cell_of_the_wrong_type(catalog: Catalog, tmp_path: Path) -> None:
    vms: list[Any] = [vm("a", "icx-1", "icelake-server-v2", 7), "not a row", vm("c", "icx-1", "icelake-sp", "none")]
    assert _errors(catalog, write_json(tmp_path / "inv.json", HOSTS, vms)) == {
        ("inv.json", "vms", 1, "mitigations"), ("inv.json", "vms", 2, "(row)")}


def test_csv_rows_keep_their_numbers_after_a_broken_row(catalog: Catalog, tmp_path: Path) -> None:
    d = tmp_path / "inv"
    write_dir(d, HOSTS, VMS, "csv")
    lines = (d / "vms.csv").read_text().splitlines()
    assert lines[0] == '"form","host","mitigations","name","personality"'  # as_tables sorts the columns
    lines.insert(2, '"too","few"')  # data row 2
    lines.append('"intel","nowhere","none","late","icelake-sp"')  # data row 6, after the broken one
    (d / "vms.csv").write_text("\n".join(lines) + "\n")
    assert _errors(catalog, d) == {("vms.csv", "vms", 2, "(row)"), ("vms.csv", "vms", 6, "host")}


def test_unknown_columns_are_a_warning_and_missing_required_ones_an_error(catalog: Catalog, tmp_path: Path) -> None:
    f = load(catalog, write_json(tmp_path / "inv.json", HOSTS, [dict(v, owner="team-a") for v in VMS]))
    assert not f.errors and f.warnings == [f"{tmp_path / 'inv.json'}: vms: column 'owner' is not part of the "
                                           "inventory schema and is ignored"]
    h, v = as_tables(HOSTS, VMS)
    (tmp_path / "d").mkdir()
    pq.write_table(h, tmp_path / "d" / "hosts.parquet")
    pq.write_table(v.drop_columns(["form"]), tmp_path / "d" / "vms.parquet")
    with pytest.raises(InputError, match=r"vms.parquet: vms: required column\(s\) 'form' missing"):
        read_inventory([tmp_path / "d"])


def test_parquet_columns_of_other_types(catalog: Catalog, tmp_path: Path) -> None:
    """Lists (joined with ','), dictionaries and large strings are read as text."""
    h, _ = as_tables(HOSTS, VMS)
    v = pa.table({"name": pa.array(["a", "b"], type=pa.large_string()), "host": ["icx-1", "icx-2"],
                  "personality": pa.array(["icelake-server-v2"] * 2).dictionary_encode(),
                  "mitigations": pa.array([["retpoline"], ["retpoline", "bhb-short"]]),
                  "form": ["intel", "kvm"]})
    (tmp_path / "d").mkdir()
    pq.write_table(h, tmp_path / "d" / "hosts.parquet")
    pq.write_table(v, tmp_path / "d" / "vms.parquet")
    f = load(catalog, tmp_path / "d")
    assert not f.errors
    assert sorted(c.mitigations for c in f.vm_classes) == ["bhb-short,retpoline", "retpoline"]


def test_inventory_shapes_refused(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="one table per file"):
        read_inventory([tmp_path / "x.parquet"])
    with pytest.raises(InputError, match="no such file"):
        read_inventory([tmp_path / "nope.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no hosts table"):
        read_inventory([tmp_path / "empty"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_inventory([tmp_path / "bad.json"])
    (tmp_path / "list.json").write_text('{"hosts": {}, "vms": []}')
    with pytest.raises(InputError, match="field 'hosts' must be a list"):
        read_inventory([tmp_path / "list.json"])


def test_error_log_orders_hosts_first_then_rows() -> None:
    log = ErrorLog()
    log.add("f", "vms", "host", "m1", [5, 2])
    log.add("f", "hosts", "cpu", "m2", [9])
    log.add("f", "vms", "name", "m3", [2])
    assert [(e.table, e.row, e.field) for e in log.first()] == [("hosts", 9, "cpu"), ("vms", 2, "host"),
                                                                ("vms", 2, "name"), ("vms", 5, "host")]
    assert log.total == 4 and len(log.first(2)) == 2
    assert str(RowError("f.csv", "vms", 3, "form", "bad")) == "f.csv: vms row 3: field 'form': bad"


def test_live_hosts_with_the_same_bits_are_one_class(catalog: Catalog, tmp_path: Path) -> None:
    facts = catalog.get("sapphirerapids").facts.to_json()
    other_source = json.loads(json.dumps(facts))
    other_source["identity_source"] = "another reading"
    for r in other_source["registers"].values():
        r["sources"] = {"*": "read on another day"}
    other_bits = json.loads(json.dumps(facts))
    other_bits["registers"]["cpuid_7_2_edx"]["value"] = "0x0"
    hosts = [host("a", facts), host("b", other_source), host("c", other_bits)]
    f = load(catalog, write_json(tmp_path / "inv.json", hosts, [vm("v", "a", "icelake-sp", "none")]))
    assert not f.errors
    assert f.host_class.tolist() == [0, 0, 1]


def test_duplicate_names_are_found_when_every_hash_collides(catalog: Catalog, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """VM names are compared as strings wherever their hashes are equal: with every hash equal, the duplicates
    (and only they) are still found, each against its earliest row; blank names are still 'required'."""
    import numpy as np

    from pvmit.fleet import classes

    real = classes._name_hashes

    def colliding(col):  # type: ignore[no-untyped-def]
        hashes, blank = real(col)
        return np.zeros_like(hashes), blank

    monkeypatch.setattr(classes, "_name_hashes", colliding)
    vms = [vm("a", "icx-1", "icelake-sp", "none"), vm("b", "icx-1", "icelake-sp", "none"),
           vm("a", "icx-1", "icelake-sp", "none"), vm(" ", "icx-1", "icelake-sp", "none"),
           vm("b", "icx-1", "icelake-sp", "none"), vm("c", "icx-1", "icelake-sp", "none")]
    f = load(catalog, write_json(tmp_path / "inv.json", HOSTS, vms))
    msgs = {e.row: e.message for e in f.errors.first()}
    assert msgs == {3: "duplicate VM name 'a' (first at row 1)", 4: "required, but empty",
                    5: "duplicate VM name 'b' (first at row 2)"}
    assert f.vm_names.to_pylist() == ["a", "b", "c"]
