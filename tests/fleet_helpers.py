"""Small fleets for the fleet tests: inventories as Python data, written in any format, and planned in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from pvmit.catalog.loader import Catalog
from pvmit.fleet.classes import Fleet, Resolver, collapse
from pvmit.fleet.generate import write_inventory
from pvmit.fleet.inventory import read_inventory
from pvmit.fleet.plan import Judge, Plan, plan


def host(name: str, cpu: Any, **kw: Any) -> dict[str, Any]:
    return {"name": name, "cpu": cpu, **kw}


def vm(name: str, on: str, personality: str, mitigations: Any, form: str = "intel", **kw: Any) -> dict[str, Any]:
    return {"name": name, "host": on, "personality": personality, "mitigations": mitigations, "form": form, **kw}


def write_json(path: Path, hosts: list[dict[str, Any]], vms: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"hosts": hosts, "vms": vms}))
    return path


def as_tables(hosts: list[dict[str, Any]], vms: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    def table(rows: list[dict[str, Any]]) -> pa.Table:
        cols = sorted({k for r in rows for k in r})
        return pa.table({c: pa.array([None if r.get(c) is None else str(r[c]) for r in rows], type=pa.string())
                         for c in cols})
    return table(hosts), table(vms)


def write_dir(path: Path, hosts: list[dict[str, Any]], vms: list[dict[str, Any]], fmt: str) -> Path:
    h, v = as_tables(hosts, vms)
    write_inventory(h, v, path, fmt)
    return path


def load(catalog: Catalog, *paths: Path) -> Fleet:
    return collapse(read_inventory(list(paths)), Resolver(catalog))


def plan_of(catalog: Catalog, *paths: Path, judge: Judge | None = None) -> Plan:
    return plan(load(catalog, *paths), judge)


# A small mixed fleet: two Ice Lake hosts and a Sapphire Rapids host in one cluster, two Cascade Lake hosts in
# another, one EPYC Milan host in its own.
HOSTS = [
    host("icx-1", "icelake-sp", cluster="new"),
    host("icx-2", "Icelake-Server", cluster="new"),
    host("spr-1", "SapphireRapids", cluster="new"),
    host("clx-1", "cascadelake-sp", cluster="old"),
    host("clx-2", "Cascadelake-Server", cluster="old"),
    host("milan-1", "EPYC-Milan", cluster="amd"),
]
VMS = [
    # booted as Icelake-Server-v2 (no eIBRS shown): relies on retpoline and reported it
    vm("rp-1", "icx-1", "icelake-server-v2", "retpoline"),
    # a Cascade Lake guest shown eIBRS uses the short BHB loop, reported through the kvm form
    vm("bhb-1", "clx-1", "cascadelake-server-v2", "bhb-short", form="kvm"),
    # never reported, no interface offered
    vm("old-1", "clx-2", "Cascadelake-Server", "unenlightened", form="none"),
    # an AMD guest that relies on nothing
    vm("amd-1", "milan-1", "EPYC-Milan", "none", form="neutral"),
]
