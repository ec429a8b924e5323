"""Synthetic fleets built on catalog models, for benchmarks and examples, and the sample inventory pvmit ships.

A fleet is a mix of server generations in clusters (the hosts among which a VMM computes MITIGATION_ENUM). VMs
boot with a personality their cluster offers (a QEMU named model, a built-in template, or host-passthrough), and an
enlightened guest reports what a Linux guest shown that personality relies on (`linux.model.predict`), limited to
the bits its cluster offers; the rest never report. Rows are drawn with numpy, so a million VMs take seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pvmit.catalog.loader import Catalog
from pvmit.derive import mitigations_to_bits
from pvmit.errors import InputError
from pvmit.fleet.inventory import SCHEMA, bits_label, write_table
from pvmit.interface.policy import supported_requests
from pvmit.linux.model import predict
from pvmit.userfiles import staged, write_atomic
from pvmit.vmm.personality import resolve


@dataclass(frozen=True)
class Kind:
    """One slice of the host fleet: a catalog model in a cluster, its share, and host settings some hosts get."""

    model: str
    cluster: str
    share: float
    settings: tuple[tuple[float, dict[str, str]], ...] = ()  # (fraction of these hosts, settings)


MIX = (
    Kind("skylake-sp", "skx", 0.04),
    Kind("cascadelake-sp", "clx", 0.13, ((0.3, {"unreported": "trust"}),)),
    Kind("cooperlake", "clx", 0.02),
    Kind("icelake-sp", "icx-spr", 0.18),
    Kind("sapphirerapids", "icx-spr", 0.12, ((0.1, {"force_on": "BHI_DIS_S"}),)),
    Kind("emeraldrapids", "emr-gnr", 0.08),
    Kind("graniterapids", "emr-gnr", 0.05),
    Kind("sierraforest", "srf", 0.03),
    Kind("epyc-rome", "zen2", 0.08),
    Kind("epyc-milan", "zen3", 0.12),
    Kind("epyc-genoa", "zen4", 0.11),
    Kind("epyc-turin", "zen4", 0.04),
)
"""A plausible mixed fleet of server generations, Intel and AMD, 2017-2024."""

PERSONALITIES = {
    "skx": ("Skylake-Server",),
    "clx": ("Cascadelake-Server", "cascadelake-server-v2"),
    "icx-spr": ("Icelake-Server", "icelake-server-v2"),
    "emr-gnr": ("SapphireRapids",),
    "srf": ("SierraForest",),
    "zen2": ("EPYC-Rome",),
    "zen3": ("EPYC-Milan", "EPYC-Rome"),
    "zen4": ("EPYC-Genoa", "EPYC-Milan"),
}
"""What VMs in each cluster boot with (the cluster's baseline QEMU models); some VMs use host-passthrough."""

SITES = ("fra1", "ams2", "iad1", "sjc3")
ROLES = ("web", "db", "cache", "batch", "ci", "k8s", "vdi", "etl")
FORMS = ("intel", "kvm", "neutral")


def generate(catalog: Catalog, vms: int, hosts: int, seed: int = 1, passthrough: float = 0.1,
             unenlightened: float = 0.3, sites: int = len(SITES)) -> tuple[pa.Table, pa.Table]:
    """(hosts, vms) tables for a synthetic fleet over `sites` sites; deterministic for a seed."""
    if hosts < 1 or vms < 0:
        raise InputError("a fleet needs at least one host and no fewer than zero VMs")
    if not 1 <= sites <= len(SITES):
        raise InputError(f"sites must be 1 to {len(SITES)}")
    rng = np.random.default_rng(seed)
    shares = np.array([k.share for k in MIX])
    kind = rng.choice(len(MIX), size=hosts, p=shares / shares.sum())
    kind[: min(hosts, len(MIX))] = np.arange(min(hosts, len(MIX)))  # every kind present when there is room
    host_settings: dict[str, list[str | None]] = {c: [None] * hosts for c in ("force_on", "force_off", "unreported")}
    for i, k in enumerate(MIX):
        idx = np.flatnonzero(kind == i)
        for frac, s in k.settings:
            chosen = idx[rng.random(idx.size) < frac]
            for col, val in s.items():
                for h in chosen.tolist():
                    host_settings[col][h] = val
    site = rng.integers(0, sites, size=hosts)
    host_names = [f"{SITES[s]}-{MIX[k].cluster}-{i:05d}" for i, (s, k) in enumerate(zip(site, kind, strict=True))]
    hosts_t = pa.table({
        "name": pa.array(host_names, type=pa.string()),
        "cpu": pa.array([MIX[k].model for k in kind], type=pa.string()),
        "cluster": pa.array([f"{SITES[s]}-{MIX[k].cluster}" for s, k in zip(site, kind, strict=True)],
                            type=pa.string()),
        **{c: pa.array(v, type=pa.string()) for c, v in host_settings.items()},
    })

    # What each cluster offers: MITIGATION_ENUM over its host models (sites do not change the models' mix much,
    # but the planner computes it per site-cluster from the rows, as the VMM would)
    site_cluster = [f"{SITES[s]}-{MIX[k].cluster}" for s, k in zip(site, kind, strict=True)]
    offered: dict[str, int] = {}
    for sc in sorted(set(site_cluster)):
        models = {MIX[k].model for k, c in zip(kind.tolist(), site_cluster, strict=True) if c == sc}
        offered[sc] = supported_requests(catalog.get(m).facts for m in sorted(models))

    host_of = rng.integers(0, hosts, size=vms)
    hk = kind[host_of]
    # personality: the cluster's baseline models, or host-passthrough (the host's own model)
    options = [list(PERSONALITIES[k.cluster]) + [k.model] for k in MIX]
    base_pick = rng.random(vms)
    pers_name: list[str] = sorted({p for o in options for p in o})
    pers_code = np.empty(vms, dtype=np.int64)
    for i, opts in enumerate(options):
        sel = np.flatnonzero(hk == i)
        n_base = len(opts) - 1
        choice = np.where(base_pick[sel] < passthrough, n_base, rng.integers(0, n_base, size=sel.size))
        codes = np.array([pers_name.index(o) for o in opts], dtype=np.int64)
        pers_code[sel] = codes[choice]
    relies = [predict(resolve(catalog, p).facts).relies_on for p in pers_name]
    enlightened = rng.random(vms) >= unenlightened
    form_code = rng.integers(0, len(FORMS), size=vms)
    no_form = ~enlightened & (rng.random(vms) < 0.5)  # half the unenlightened VMs are not offered the interface
    sc_names = sorted(offered)
    sc_code_of_host = np.array([sc_names.index(c) for c in site_cluster], dtype=np.int64)
    vm_sc = sc_code_of_host[host_of]
    # what a guest reports: what it relies on, limited to what its cluster offers
    combo = pers_code * len(sc_names) + vm_sc
    uniq, inv = np.unique(combo, return_inverse=True)
    reported_text = []
    for c in uniq.tolist():
        p, sc = divmod(c, len(sc_names))
        bits = mitigations_to_bits(relies[p]) & offered[sc_names[sc]]
        reported_text.append(bits_label(bits))
    mit_values = sorted(set(reported_text)) + ["unenlightened"]
    mit_code = np.array([mit_values.index(t) for t in reported_text], dtype=np.int64)[inv.reshape(-1)]
    mit_code = np.where(enlightened, mit_code, len(mit_values) - 1)
    form_values = [*FORMS, "none"]
    form_code = np.where(no_form, len(FORMS), form_code)
    # a few VMs carry their own operator settings
    vm_force_on = np.where(rng.random(vms) < 0.02, 0, -1)
    vm_unrep = np.where(rng.random(vms) < 0.05, 0, -1)
    role = rng.integers(0, len(ROLES), size=vms)
    vm_names = [f"{ROLES[r]}-{i:07d}" for i, r in enumerate(role.tolist())]

    def dict_col(codes: np.ndarray[Any, Any], values: list[str]) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(
            pa.array(codes.astype(np.int32), mask=codes < 0, type=pa.int32()), pa.array(values, type=pa.string()))

    vms_t = pa.table({
        "name": pa.array(vm_names, type=pa.string()),
        "host": dict_col(host_of, host_names),
        "personality": dict_col(pers_code, pers_name),
        "mitigations": dict_col(mit_code, mit_values),
        "form": dict_col(form_code, form_values),
        "force_on": dict_col(vm_force_on, ["RRSBA_DIS_S"]),
        "unreported": dict_col(vm_unrep, ["trust"]),
    })
    return hosts_t, vms_t


def write_inventory(hosts: pa.Table, vms: pa.Table, out: Path, fmt: str = "parquet") -> list[Path]:
    """A .json path gets one JSON inventory; any other path is a directory with hosts.<fmt> and vms.<fmt>."""
    if out.suffix.lower() == ".json":
        doc = {"schema": SCHEMA, "hosts": as_records(hosts), "vms": as_records(vms)}
        write_atomic(out, json.dumps(doc, indent=1) + "\n")
        return [out]
    if fmt not in ("parquet", "csv", "json"):
        raise InputError(f"inventory format must be parquet, csv or json, not {fmt!r}")
    paths = [out / f"hosts.{fmt}", out / f"vms.{fmt}"]
    with staged() as s:  # both tables, or neither
        s.directory(out)
        write_table(_plain(hosts) if fmt != "parquet" else hosts, s.path(paths[0]))
        write_table(_plain(vms) if fmt != "parquet" else vms, s.path(paths[1]))
    return paths


def _plain(t: pa.Table) -> pa.Table:
    return pa.table({c: t.column(c).cast(pa.string()) for c in t.column_names})


def as_records(t: pa.Table) -> list[dict[str, Any]]:
    """Rows as JSON objects, absent cells left out."""
    return [{k: v for k, v in r.items() if v is not None} for r in _plain(t).to_pylist()]


def sample_path() -> Path:
    """The sample inventory shipped with pvmit (a few hundred VMs over a mixed fleet)."""
    p = resources.files("pvmit.fleet") / "data" / "sample-inventory.json"
    return Path(str(p))


__all__ = ["MIX", "Kind", "as_records", "generate", "sample_path", "write_inventory"]
