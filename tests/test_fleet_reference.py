"""The planner's columnar checks against a reading of the same rows one by one, written plainly here.

`collapse` checks columns once per distinct value with array passes, hashes names, reads Parquet columns on demand
and groups rows by mixed-radix keys. This file derives the same answers the slow way, a row at a time with dicts, and
on a generated fleet with faults of every kind (in JSON, CSV and Parquet, one row group or many with a dictionary
column) asks for the same: the same errors (file, table, row, field, message, in order), the same valid hosts in
the same classes, the same valid VMs, each in the same class, and the same classes in the same order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pvmit.catalog.loader import Catalog
from pvmit.derive import mitigations_to_bits
from pvmit.fleet.classes import DUPLICATES_NAMED, HostClass, Resolver, VmClass, collapse
from pvmit.fleet.generate import generate, write_inventory
from pvmit.fleet.inventory import (
    HOST_COLUMNS,
    VM_COLUMNS,
    RawInventory,
    TableSource,
    bits_label,
    mitigations_label,
    parse_bits,
    parse_form,
    parse_mitigations,
    parse_relies_on,
    parse_supported,
    parse_unreported,
    read_inventory,
)
from pvmit.interface.bhi import BhiPolicy, shown_long_bit
from pvmit.interface.policy import PartialSettings, supported_requests

Error = tuple[str, str, int, str, str]


def _cells(src: TableSource, columns: dict[str, bool]) -> dict[str, list[Any]]:
    return {c: src.column(c).to_pylist() for c in columns}


def _parse(parse: Any, v: str, prefix: bool) -> tuple[Any, str | None]:
    try:
        return parse(v), None
    except ValueError as e:
        return None, (f"{v!r}: {e}" if prefix else str(e))


def reference(raw: RawInventory, resolver: Resolver, policy: BhiPolicy) -> dict[str, Any]:
    """Every row checked in turn. Hosts: every problem of a row is reported, a name is a duplicate when an earlier
    valid row has it, settings are checked where nothing else is wrong. VMs: the first problem of a row is
    reported, in the order name, host, personality, mitigations, form, supported, force_on, force_off, unreported,
    relies_on, what the class combines."""
    errors: list[Error] = [(e.file, e.table, e.row, e.field, e.message) for e in raw.errors.first()]
    src = raw.hosts
    d = _cells(src, HOST_COLUMNS)
    names: list[str] = []
    klass: list[int] = []
    cluster: list[str | None] = []
    classes: dict[HostClass, int] = {}
    seen: dict[str, int] = {}
    invalid: dict[str, int] = {}
    for i in range(src.num_rows):
        row = int(src.rows[i])
        problems: list[tuple[str, str | None]] = []
        name = (d["name"][i] or "").strip()
        if not name:
            problems.append(("name", "required, but empty"))
        elif name in seen:
            problems.append(("name", f"duplicate host name {name!r} (first at row {seen[name]})"))
        cpu, cpu_err = _parse(lambda v: resolver.host_cpu(v, src.base_dir), d["cpu"][i], False) if d["cpu"][i] \
            else (None, "required, but empty")
        on, on_err = _parse(parse_bits, d["force_on"][i], True) if d["force_on"][i] else (None, None)
        off, off_err = _parse(parse_bits, d["force_off"][i], True) if d["force_off"][i] else (None, None)
        un, un_err = _parse(parse_unreported, d["unreported"][i], True) if d["unreported"][i] else (None, None)
        problems += [("cpu", cpu_err), ("force_on", on_err), ("force_off", off_err), ("unreported", un_err)]
        problems = [(f, m) for f, m in problems if m]
        settings = None
        if not problems:
            try:
                settings = PartialSettings(on, off, un)
            except ValueError as e:
                problems.append(("force_off", str(e)))
        if problems or src.bad[i] or settings is None:
            errors += [(src.file, src.table, row, f, str(m)) for f, m in problems]
            if name and name not in seen:
                invalid.setdefault(name, row)
            continue
        seen[name] = row
        names.append(name)
        klass.append(classes.setdefault(HostClass(cpu[1], cpu[0], settings, cpu[2]), len(classes)))
        cluster.append(d["cluster"][i])
    host_classes = list(classes)
    keys: dict[str | None, set[str]] = {}
    for k, c in zip(klass, cluster, strict=True):
        keys.setdefault(c, set()).add(host_classes[k].cpu_key)
    facts = {c.cpu_key: c.facts for c in host_classes}
    offered = {c: supported_requests((facts[k] for k in sorted(ks)), policy) for c, ks in keys.items()}
    long_bit = {c: shown_long_bit(policy, (facts[k] for k in sorted(ks))) for c, ks in keys.items()}
    index = {n: i for i, n in enumerate(names)}

    src = raw.vms
    d = _cells(src, VM_COLUMNS)
    first_of: dict[str, int] = {}
    duplicates = 0
    vm_classes: dict[VmClass, int] = {}
    vms: list[tuple[str, str, int]] = []
    parsers = {"personality": lambda v: resolver.personality(v, src.base_dir), "mitigations": parse_mitigations,
               "form": parse_form, "supported": parse_supported, "force_on": parse_bits, "force_off": parse_bits,
               "unreported": parse_unreported, "relies_on": parse_relies_on}
    for i in range(src.num_rows):
        row = int(src.rows[i])
        bad = bool(src.bad[i])
        problem: tuple[str, str] | None = None
        name = d["name"][i]
        if name is None or not name or (name[0] in " \t\n\v\f\r" and not name.strip()):
            problem = ("name", "required, but empty")
        elif first_of.setdefault(name, i) != i and not bad:
            duplicates += 1
            problem = ("name", f"duplicate VM name {name!r} (first at row {int(src.rows[first_of[name]])})"
                       if duplicates <= DUPLICATES_NAMED else "duplicate VM name (an earlier row has it)")
        if bad:
            continue
        host = (d["host"][i] or "").strip()
        if problem is None:
            if not host:
                problem = ("host", "required, but empty")
            elif host not in index:
                problem = ("host", f"host {host!r} is wrong in its own row (hosts row {invalid[host]})"
                           if host in invalid else f"no host named {host!r} in the inventory")
        values: dict[str, Any] = {}
        for col, parse in parsers.items():
            v = d[col][i]
            if problem is not None:
                break
            if v is None or not v.strip():
                values[col] = None
                if col in ("personality", "mitigations", "form"):
                    problem = (col, "required, but empty")
                continue
            values[col], msg = _parse(parse, v, False)
            if msg is not None:
                problem = (col, msg if v.strip() in msg else f"{v!r}: {msg}")
        if problem is None:
            reported, form, promised = values["mitigations"], values["form"], values["supported"]
            if form is None:
                supported = 0
                if reported is not None:
                    problem = ("form", f"form none: a VM without the interface cannot have reported "
                                       f"{mitigations_label(reported)} (use mitigations 'unenlightened')")
                elif promised:
                    problem = ("supported", "form none: a VM without the interface is promised nothing")
            elif promised is not None:
                supported = promised
                extra = mitigations_to_bits(reported or frozenset()) & ~supported
                if extra:
                    problem = ("mitigations", f"reports {bits_label(extra)}, which its MITIGATION_ENUM (supported: "
                                              f"{bits_label(supported)}) never offered")
            else:
                supported = offered.get(cluster[index[host]], 0) | mitigations_to_bits(reported or frozenset())
            if problem is None and values["relies_on"] is not None:
                if reported is not None:
                    problem = ("relies_on", f"relies_on is for a VM that never reported; this one reported "
                                            f"{mitigations_label(reported)} through the interface")
                else:
                    reported = values["relies_on"]
            if problem is None:
                try:
                    settings = PartialSettings(values["force_on"], values["force_off"], values["unreported"])
                except ValueError as e:
                    problem = ("force_off", str(e))
        if problem is not None:
            errors.append((src.file, src.table, row, *problem))
            continue
        pkey, plabel, pfacts = values["personality"]
        vc = VmClass(plabel, pkey, reported, form, supported, settings, pfacts, values["relies_on"] is not None,
                     long_bit[cluster[index[host]]] if form is not None else None)
        vms.append((name, host, vm_classes.setdefault(vc, len(vm_classes))))
    order = {"hosts": 0, "vms": 1}
    errors.sort(key=lambda e: (order[e[1]], e[2]))  # stable: within a row, in the order found
    return {"errors": errors, "host_names": names, "host_class": klass, "host_cluster": cluster,
            "host_classes": [c.to_json() for c in host_classes], "vms": vms,
            "vm_classes": [c.to_json() for c in vm_classes]}


def fast(raw: RawInventory, resolver: Resolver, policy: BhiPolicy) -> dict[str, Any]:
    f = collapse(raw, resolver, policy)
    return {"errors": [(e.file, e.table, e.row, e.field, e.message) for e in f.errors.first()],
            "host_names": f.host_names, "host_class": f.host_class.tolist(), "host_cluster": f.host_cluster,
            "host_classes": [c.to_json() for c in f.host_classes],
            "vms": list(zip(f.vm_names.to_pylist(), [f.host_names[int(h)] for h in f.vm_host],
                            f.vm_class.tolist(), strict=True)),
            "vm_classes": [c.to_json() for c in f.vm_classes]}


DUP, PAD, HOST, PADDED_HOST = object(), object(), object(), object()  # an earlier name; this one padded; a host
HOST_FAULTS: list[dict[str, Any]] = [
    {"name": DUP}, {"name": ""}, {"name": "  "}, {"name": None}, {"name": PAD}, {"cpu": "no-such-cpu"}, {"cpu": ""},
    {"cpu": None}, {"cpu": "Icelake-Server"}, {"cpu": " icelake-sp "}, {"force_on": "NOT_A_BIT"},
    {"force_on": "BHI_DIS_S"}, {"force_on": "none"}, {"force_on": "BHI_DIS_S", "force_off": "BHI_DIS_S"},
    {"unreported": "sometimes"}, {"unreported": " TRUST "}, {"cluster": None}, {"cluster": "other"},
    {"name": DUP, "cpu": "no-such-cpu"}, {"name": DUP, "force_on": "BHI_DIS_S", "force_off": "BHI_DIS_S"},
]
VM_FAULTS: list[dict[str, Any]] = [
    {"name": DUP}, {"name": ""}, {"name": " "}, {"name": None}, {"name": "\t"}, {"name": PAD}, {"host": "nowhere"},
    {"host": ""}, {"host": None}, {"host": PADDED_HOST}, {"host": HOST}, {"personality": "no-such"},
    {"personality": ""}, {"personality": "Icelake-Server"}, {"mitigations": "retpoline,spectre"},
    {"mitigations": ""}, {"mitigations": "both"}, {"mitigations": "Retpoline"}, {"mitigations": "none,retpoline"},
    {"form": "hypercall"}, {"form": "none"}, {"form": ""}, {"form": "KVM"}, {"supported": "bhb-short"},
    {"supported": "retpoline"}, {"supported": "none"}, {"supported": "junk"}, {"force_on": "RRSBA_DIS_S"},
    {"force_on": "NOPE"}, {"force_off": "RRSBA_DIS_S"}, {"force_off": "BHI_DIS_S"}, {"force_off": "bad"},
    {"unreported": "trust"}, {"unreported": "maybe"}, {"name": DUP, "host": "nowhere"},
    {"form": "none", "mitigations": "unenlightened", "supported": "retpoline"},
    {"form": "none", "mitigations": "retpoline"}, {"relies_on": "retpoline"}, {"relies_on": "junk"},
    {"relies_on": "unenlightened"}, {"form": "none", "mitigations": "unenlightened", "relies_on": "bhb-short"},
    {"mitigations": "unenlightened", "relies_on": "none"},
]


def _inject(cols: dict[str, list[Any]], faults: list[dict[str, Any]], count: int, hosts: list[str],
            rng: random.Random) -> None:
    """`count` faults, every kind in turn, each in a row drawn at random."""
    n = len(cols["name"])
    for k in range(count):
        i = rng.randrange(n)
        for col, value in faults[k % len(faults)].items():
            if value is DUP:  # an earlier row's
                value = cols["name"][rng.randrange(max(i, 1))]
            elif value is PAD:
                value = f" {cols['name'][i]}\t"
            elif value is HOST or value is PADDED_HOST:
                value = rng.choice(hosts) if value is HOST else f" {rng.choice(hosts)} "
            cols[col][i] = value


def faulty_fleet(catalog: Catalog, vms: int, hosts: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """A generated fleet with a fault in one host row in two and one VM row in twenty, every kind in turn."""
    h, v = generate(catalog, vms, hosts, seed)
    rng = random.Random(seed)
    H, V = h.to_pydict(), v.to_pydict()
    V["supported"] = [None] * len(V["name"])
    V["force_off"] = [None] * len(V["name"])
    V["relies_on"] = [None] * len(V["name"])
    _inject(H, HOST_FAULTS, len(H["name"]) // 2, [], rng)
    _inject(V, VM_FAULTS, len(V["name"]) // 20, [x for x in H["name"] if x], rng)
    return (pa.table({c: pa.array(x, type=pa.string()) for c, x in H.items()}),
            pa.table({c: pa.array(x, type=pa.string()) for c, x in V.items()}))


@pytest.mark.parametrize(("fmt", "policy"), [("json-file", BhiPolicy.FORCE_BHI_DIS_S), ("csv", BhiPolicy.CMDLINE_LONG),
                                            ("parquet", BhiPolicy.LONG_NEEDED_BIT),
                                            ("parquet-row-groups", BhiPolicy.FORCE_BHI_DIS_S)])
def test_columnar_checks_agree_with_a_row_by_row_reading(catalog: Catalog, tmp_path: Path, fmt: str,
                                                         policy: BhiPolicy) -> None:
    hosts, vms = faulty_fleet(catalog, 3000, 200, seed=7)
    if fmt == "json-file":
        path = tmp_path / "inv.json"
        path.write_text(json.dumps({"hosts": hosts.to_pylist(), "vms": vms.to_pylist()}))
    elif fmt == "parquet-row-groups":  # many row groups, hence many dictionaries for one column
        path = tmp_path / "inv"
        path.mkdir()
        pq.write_table(hosts, path / "hosts.parquet", row_group_size=7)
        at = vms.column_names.index("host")
        pq.write_table(vms.set_column(at, "host", vms.column("host").dictionary_encode()), path / "vms.parquet",
                       row_group_size=250)
    else:
        path = tmp_path / "inv"
        write_inventory(hosts, vms, path, fmt)
    want = reference(read_inventory([path]), Resolver(catalog), policy)
    got = fast(read_inventory([path]), Resolver(catalog), policy)
    assert len(want["errors"]) > 100 and len(want["vms"]) > 2000 and len(want["vm_classes"]) > 20  # a real test
    for key in want:
        assert got[key] == want[key], key
